"""What a load refuses before it fills the caller's state: a state dict the checkpoint cannot
fill (missing keys, other shapes), checked once before any data is fetched; and a stored
non-tensor value whose pickle needs more than torch's safe allowlist, since DCP's planner
unpickles it fully (code from the bucket could run).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from shardckpt.compat import flatten_state_dict
from shardckpt.errors import ManifestError, StateDictMismatchError


def check_state_dict(state_dict: dict[str, Any], metadata: Metadata, uri: str) -> None:
    """Raise :class:`StateDictMismatchError` if the checkpoint cannot fill ``state_dict``:
    keys it lacks, or tensors whose (global) shape differs from the saved one."""
    flat = flatten_state_dict(state_dict)
    saved = metadata.state_dict_metadata
    missing = [k for k in flat if k not in saved]
    shapes = [
        f"{k}: saved {list(saved[k].size)}, given {list(v.shape)}"
        for k, v in flat.items()
        if k in saved
        and isinstance(v, torch.Tensor)
        and isinstance(saved[k], TensorStorageMetadata)
        and saved[k].size != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys not in the checkpoint: {', '.join(missing[:10])}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {'; '.join(shapes[:10])}")
    if problems:
        raise StateDictMismatchError(f"{uri} cannot fill this state dict: " + "; ".join(problems))


# Unpickling a BytesIO only restores its buffer (no code runs), and DCP pickles BytesIO
# values like any other: they load without ``trusted=True``.
_SAFE_EXTRA = [io.BytesIO]


def check_safe_to_unpickle(data: bytes, fqn: str, uri: str) -> None:
    """Refuse a non-tensor value whose pickle needs more than torch's safe allowlist (plus
    ``io.BytesIO``): DCP's planner unpickles it fully."""
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA):
            torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise ManifestError(
            f"{uri}: value {fqn!r} needs full unpickling, which can run code from the bucket; "
            f"pass trusted=True only for checkpoints you trust ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
