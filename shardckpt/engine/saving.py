"""Saving one checkpoint: the DCP call, its one error, and what an overwrite keeps.

The :class:`~shardckpt.Checkpointer` (one checkpoint per step, saved by every rank over its
gloo group) and the Lightning plugin (one checkpoint per path, saved by one process) write
through :func:`write_checkpoint`, so a failure reads the same from both: one
``SaveFailedError`` naming the save and every failed rank, never DCP's ``CheckpointException``
(a BaseException). Deleting after a commit (retention, the generation an overwrite retires)
never fails the save that committed: it warns, and what stays is left for later
(:func:`tidy_after_commit`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import SavePlanner

from shardckpt._util.abort import AbortSwitch
from shardckpt._util.quiet import single_process_dcp
from shardckpt.dcp.incremental import ContentIndex
from shardckpt.dcp.writer import ShardWriter, WriterOptions
from shardckpt.errors import SaveFailedError, describe_failures, first_cause
from shardckpt.format.layout import Layout
from shardckpt.retention.deletion import delete_replaced, keys_in_use
from shardckpt.store import ObjectStore


def write_checkpoint(
    store: ObjectStore,
    layout: Layout,
    state: dict[str, Any],
    *,
    what: str,
    options: WriterOptions,
    switch: AbortSwitch,
    attributes: dict[str, Any],
    base: ContentIndex | None = None,
    planner: SavePlanner | None = None,
    group: dist.ProcessGroup | None = None,
    rank: int = 0,
) -> ShardWriter:
    """Write ``state`` (staged: nothing modifies it meanwhile) as the checkpoint at
    ``layout`` of ``store``, commit it and return its writer (the figures of the save).

    ``what`` names the save in the error ("save of step 7 to s3://..."); ``switch`` aborts
    it; ``attributes`` go into the manifest; ``base``: the checkpoint an incremental save
    reuses; ``group``: the ranks that save together (None: this process alone, even where
    torch.distributed is initialized, as for a Lightning checkpoint saved by rank 0).
    With ``options.overwrite`` the data of the checkpoint replaced stays for one more
    generation, so a reader that read its manifest finishes; the generation before it goes
    (``retention.deletion.delete_replaced``).
    """
    replaced: set[str] | None = None
    try:
        if options.overwrite and rank == 0:
            replaced = keys_in_use(store, layout)
        uri = store.uri(layout.prefix)
        writer = ShardWriter.for_checkpoint(store, layout, uri, attributes, options, base, switch)
        with dcp_call(group):
            dcp.save(
                state,
                storage_writer=writer,
                planner=planner,
                process_group=group,
                no_dist=group is None,
            )
    except CheckpointException as exc:
        raise SaveFailedError(f"{what} failed: {describe_failures(exc)}") from first_cause(exc)
    except Exception as exc:
        raise SaveFailedError(f"{what} failed on rank {rank}: {type(exc).__name__}: {exc}") from exc
    manifest = writer.last_manifest  # the coordinator's
    if replaced is not None and manifest is not None:
        tidy_after_commit(
            f"could not delete the data {uri} no longer needs",
            lambda: delete_replaced(store, layout, manifest, replaced),
        )
    return writer


def dcp_call(group: dist.ProcessGroup | None) -> contextlib.AbstractContextManager[None]:
    """Around the engine's DCP calls: without a process group they run in one process on
    purpose, and torch's warning that they do is not news."""
    return single_process_dcp() if group is None else contextlib.nullcontext()


def tidy_after_commit(failure: str, delete: Callable[[], object]) -> None:
    """Run ``delete`` after a commit; if it fails, warn (``failure`` says what was not
    deleted) instead of failing the save: the checkpoint is committed, and what stays is
    garbage that a later retention, overwrite or gc removes."""
    try:
        delete()
    except Exception as exc:
        warnings.warn(f"shardckpt: {failure}: {exc}", stacklevel=1)
