"""How a Lightning checkpoint dict is stored: the state handed to DCP, and back.

Every plain (strided) tensor goes through DCP as raw bytes, named by its place in the
checkpoint (``state_dict/layer.weight``); everything else (the structure, loop and callback
state, hyper-parameters, ...) is pickled once, on the calling thread, with each tensor
replaced by a reference. So the checkpoint comes back with the same types (``OrderedDict``
with its ``_metadata``, int keys of optimizer state, tuples) and tensors shared in several
places stay shared, as with ``torch.save``.

Trust: by default the pickled part is loaded with ``torch.load(weights_only=True)``, which is
what Lightning 2.6 with torch >= 2.6 does for a local ``.ckpt``; Lightning's own checkpoints
(loops, callbacks, optimizer and scheduler state, plain hyper-parameters) load that way.
Full unpickling is for checkpoints the caller trusts: anyone who can write to the bucket
could otherwise run code here.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from shardckpt._util.tree import Path, rebuild
from shardckpt.errors import ManifestError

# The two entries of the state DCP saves: the pickled structure and the tensors by name.
SKELETON = "skeleton"
TENSORS = "tensors"


class _TensorRef(str):
    """Stands in the pickled structure where a tensor was: the tensor's name among the
    stored tensors. A plain ``str`` subclass, so ``weights_only`` loading can allow it."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_TensorRef, (str(self),))


def to_state(checkpoint: dict[str, Any]) -> tuple[bytes, dict[str, torch.Tensor]]:
    """(the structure pickled, with tensors replaced by references; the tensors by name).
    A tensor found at several places is stored once."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}

    def leaf(path: Path, value: Any) -> Any:
        if not (isinstance(value, torch.Tensor) and _storable(value)):
            return value
        name = names.get(id(value))
        if name is None:
            name = base = "/".join(str(p) for p in path) or "tensor"
            n = 1
            while name in tensors:
                name, n = f"{base}#{n}", n + 1
            names[id(value)], tensors[name] = name, value
        return _TensorRef(name)

    buffer = io.BytesIO()
    torch.save(rebuild(checkpoint, leaf), buffer)
    return buffer.getvalue(), tensors


def from_state(state: dict[str, Any], *, trusted: bool, map_location: Any, uri: str) -> Any:
    """The checkpoint dict back from the ``state`` DCP loaded, its tensors moved as
    ``map_location`` says (see :func:`_device_of`); ``trusted`` allows full unpickling of
    the structure."""
    blob = state.get(SKELETON)
    if not isinstance(blob, bytes):
        raise ManifestError(
            f"{uri} is a shardckpt checkpoint, but not one written by ShardckptCheckpointIO"
        )
    skeleton = _loads(blob, trusted=trusted, uri=uri)
    device = _device_of(map_location)
    tensors = {k: v if device is None else v.to(device) for k, v in state.get(TENSORS, {}).items()}

    def leaf(path: Path, value: Any) -> Any:
        if not isinstance(value, _TensorRef):
            return value
        try:
            return tensors[str(value)]
        except KeyError:
            raise ManifestError(
                f"{uri} has no tensor {str(value)!r}, which its structure refers to"
            ) from None

    return rebuild(skeleton, leaf)


def _storable(value: torch.Tensor) -> bool:
    """Tensors stored as raw bytes; others (sparse, quantized, subclasses) are pickled."""
    return (
        type(value) in (torch.Tensor, torch.nn.Parameter)
        and value.layout == torch.strided
        and not value.is_quantized
        and not value.is_nested
        and value.device.type != "meta"
    )


def _loads(blob: bytes, *, trusted: bool, uri: str) -> Any:
    if trusted:
        return torch.load(io.BytesIO(blob), weights_only=False)
    try:
        with torch.serialization.safe_globals([_TensorRef]):
            return torch.load(io.BytesIO(blob), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ManifestError(
            f"{uri}: the checkpoint holds objects that need full unpickling, which can run code from "
            "the bucket; for a checkpoint you trust pass trainer.fit(..., weights_only=False) or "
            f"ShardckptCheckpointIO(trusted=True) ({str(exc).splitlines()[0][:200]})"
        ) from None


def _device_of(map_location: Any) -> torch.device | None:
    """The device tensors go to (they are read into CPU memory), or None to leave them."""
    if map_location is None:
        return None
    if isinstance(map_location, str | torch.device):
        return torch.device(map_location)
    if isinstance(map_location, dict):
        target = map_location.get("cpu")
        return None if target is None else torch.device(target)
    if callable(map_location):  # torch.load style: fn(storage, location) -> storage
        moved = map_location(torch.UntypedStorage(0), "cpu")
        return getattr(moved, "device", None)
    raise TypeError(f"unsupported map_location {map_location!r}")
