"""Rebuilding a nested checkpoint (dicts, lists, tuples) with its leaves replaced.

A Lightning checkpoint must come back with the types it had (``OrderedDict`` with its
``_metadata``, namedtuples, int keys), so this walker copies each dict with ``copy.copy``
instead of building a plain one. (``dcp.staging`` walks state dicts its own way: plain dicts,
a DTensor's local shard, namedtuples kept whole as values.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

Path = tuple[Any, ...]


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
