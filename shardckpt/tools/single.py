"""One-process, whole-object save and load: a drop-in for ``torch.save`` / ``torch.load``
to S3 (what people use s3torchconnector's ``S3Checkpoint`` for), with shardckpt's parallel
uploads, atomic commit and checksums.

Errors are shardckpt's own (``except Exception`` catches them), never DCP's
``CheckpointException`` (a BaseException) or its ``AssertionError`` for a missing manifest.
A save runs on a thread of its own while the caller waits, so that Ctrl-C reaches the wait:
the first lets the save finish, the second aborts it (``shardckpt._util.abort``). A load reports
its progress to an ``on_bytes`` callback (``shardckpt export`` draws a bar with it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt._util.abort import wait_or_abort
from shardckpt._util.quiet import single_process_dcp
from shardckpt._util.tree import map_leaves
from shardckpt.compat import load_all
from shardckpt.dcp.reader import ShardReader
from shardckpt.dcp.writer import ShardWriter
from shardckpt.errors import CheckpointError, SaveFailedError, from_dcp
from shardckpt.store.base import StoreStats

_WRAPPED = "__shardckpt_object__"


def save(obj: Any, uri: str | os.PathLike[str], **options: Any) -> None:
    """Save ``obj`` (a state dict, or any tensor / nested container of tensors and picklable
    values) to ``uri`` as one checkpoint. Options as for :class:`ShardWriter`."""
    state = (
        obj
        if isinstance(obj, dict) and all(isinstance(k, str) for k in obj) and obj
        else {_WRAPPED: obj}
    )
    writer = ShardWriter(uri, **options)
    with single_process_dcp():
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="shardckpt-save") as pool:
                future = pool.submit(dcp.save, state, storage_writer=writer, no_dist=True)
                wait_or_abort(future, writer.abort_switch, f"the save to {writer.uri}")
        except CheckpointException as exc:
            raise from_dcp(exc, f"save to {writer.uri}", SaveFailedError)  # noqa: B904 (has its cause)


def load(
    uri: str | os.PathLike[str],
    *,
    map_location: str | torch.device | None = None,
    on_bytes: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Any:
    """Load what :func:`save` wrote (or any shardckpt checkpoint, consolidated into one
    process). ``map_location`` moves every tensor to that device. ``on_bytes(n, total)`` is
    called about every 0.1 s while data arrives, with the bytes read since the last call and
    the checkpoint's total. Options as for :class:`ShardReader` (``trusted``, ``endpoint``, ...)."""
    reader = ShardReader(uri, **options)
    reader.read_metadata()  # a missing or bad manifest: our error, not DCP's AssertionError
    assert reader.manifest is not None  # read_metadata read it (and opened the final store)
    total = reader.manifest.total_bytes
    with _reporting(reader.store.stats, total, on_bytes):
        try:
            state = load_all(reader)
        except CheckpointException as exc:
            raise from_dcp(exc, f"load of {reader.uri}", CheckpointError)  # noqa: B904 (has its cause)
    if map_location is not None:
        device = torch.device(map_location)
        state = map_leaves(state, lambda _, tensor: tensor.to(device))
    return state[_WRAPPED] if set(state) == {_WRAPPED} else state


@contextmanager
def _reporting(
    stats: StoreStats, total: int, on_bytes: Callable[[int, int], None] | None
) -> Iterator[None]:
    """Report the bytes ``stats`` counts as got while the body runs to ``on_bytes``: the reader
    fetches on threads of its own, with no hook, and its store counts every byte it gets."""
    if on_bytes is None:
        yield
        return
    start, reported = stats.bytes_got, 0
    stop = threading.Event()

    def report() -> None:
        nonlocal reported
        got = min(stats.bytes_got - start, total)  # gaps between close ranges are read too
        if got > reported:
            on_bytes(got - reported, total)
            reported = got

    def poll() -> None:
        while not stop.wait(0.1):
            report()

    thread = threading.Thread(target=poll, name="shardckpt-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        report()
