"""Torch's "torch.distributed is disabled" warning, silenced around shardckpt's own DCP calls.

``dcp.save`` / ``dcp.load`` warn that they assume one process on every call made without a
process group (and on every call with ``no_dist=True``). When shardckpt makes that call
(``shardckpt.save``, a ``Checkpointer`` in a process without ``torch.distributed``), one
process is the intent, not news, and the warning was the first thing a newcomer met on every
save and load. Only that message, only as a ``UserWarning`` and only while our call runs:
a user's own ``dcp.save`` / ``dcp.load`` with a ``ShardWriter`` / ``ShardReader`` and no
process group still gets it (their call, and torch's word on it).

``warnings.catch_warnings`` swaps the process-wide filter list (Python before 3.14 has no
per-thread filters), so a filter another thread adds while one of our calls runs is dropped
when that call ends.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_SINGLE_PROCESS = r"torch\.distributed is disabled, unavailable or uninitialized"


@contextmanager
def single_process_dcp() -> Iterator[None]:
    """Around a DCP call of ours that runs in one process on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS, category=UserWarning)
        yield
