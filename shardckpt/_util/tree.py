"""Walking a nested state (dicts, lists, tuples): the package's two walkers, side by side.

- :func:`map_leaves`, for DCP state dicts: staging snapshots every tensor leaf (and copies
  every other leaf), a whole-object load moves every tensor to a device. A DTensor's leaf is
  its local shard, rewrapped afterwards; dicts come back plain and named tuples are leaves,
  as DCP's own flattening treats them.
- :func:`rebuild`, for a Lightning checkpoint, which must come back with the types it had
  (``OrderedDict`` with its ``_metadata``, named tuples, int keys): every non-container is a
  leaf, and each dict is copied with ``copy.copy`` instead of building a plain one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from shardckpt.compat import dtensor_like

Path = tuple[Any, ...]


def keep(path: Path, value: Any) -> Any:
    """A leaf function that leaves the leaf as it is."""
    return value


def map_leaves(
    value: Any,
    on_tensor: Callable[[Path, torch.Tensor], torch.Tensor],
    on_other: Callable[[Path, Any], Any] = keep,
    path: Path = (),
) -> Any:
    """``value`` rebuilt with ``on_tensor`` applied to every tensor (a DTensor's local
    shard) and ``on_other`` to every other leaf, through dicts, lists and tuples."""
    if isinstance(value, DTensor):
        local = value.to_local()
        staged = on_tensor(path, local)
        return value if staged is local else dtensor_like(value, staged)
    if isinstance(value, torch.Tensor):
        return on_tensor(path, value)
    if isinstance(value, dict):
        return {k: map_leaves(v, on_tensor, on_other, (*path, k)) for k, v in value.items()}
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(
            map_leaves(v, on_tensor, on_other, (*path, i)) for i, v in enumerate(value)
        )
    return on_other(path, value)


def tensor_leaves(value: Any) -> dict[Path, torch.Tensor]:
    """Every tensor leaf of ``value`` (a DTensor's local shard) by its path."""
    found: dict[Path, torch.Tensor] = {}

    def collect(path: Path, tensor: torch.Tensor) -> torch.Tensor:
        found[path] = tensor
        return tensor

    map_leaves(value, collect)
    return found


def rebuild(value: Any, leaf: Callable[[Path, Any], Any], path: Path = ()) -> Any:
    """``value`` rebuilt with ``leaf(path, x)`` in place of every leaf ``x`` (anything but a
    dict, list or tuple); ``path`` is the keys and indices leading to it."""
    if isinstance(value, dict):
        out = copy.copy(value)  # keeps the type and attributes (OrderedDict._metadata)
        for k, v in value.items():
            out[k] = rebuild(v, leaf, (*path, k))
        return out
    if isinstance(value, list):
        return [rebuild(v, leaf, (*path, i)) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        items = [rebuild(v, leaf, (*path, i)) for i, v in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return leaf(path, value)
