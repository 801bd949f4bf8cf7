"""``Checkpointer``: asynchronous, atomic checkpoints for the training loop.

``save(step, state)`` blocks only for the snapshot into host buffers; upload and commit run
on one background thread. Coordination of a background save uses a dedicated gloo group
created once at start-up, so it never touches the training's (NCCL) group, and at most one
save is in flight, so the collectives of consecutive saves never interleave.

The engine's other rooms: ``background`` (the thread, the one save in flight, errors raised
once, Ctrl-C), ``saving`` (one checkpoint written and committed, shared with the Lightning
plugin), ``preemption`` (SIGTERM agreed by every rank), ``stats`` (the figures of a save).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt._util.abort import AbortSwitch
from shardckpt.dcp.incremental import ContentIndex
from shardckpt.dcp.load_checks import check_state_dict
from shardckpt.dcp.planner import ShardSavePlanner
from shardckpt.dcp.reader import ShardReader
from shardckpt.dcp.staging import HostStaging
from shardckpt.dcp.writer import split_options
from shardckpt.engine.background import SaveHandle, SaveQueue
from shardckpt.engine.preemption import Preemption
from shardckpt.engine.saving import dcp_call, tidy_after_commit, write_checkpoint
from shardckpt.engine.stats import LoadStats, SaveStats
from shardckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    from_dcp,
)
from shardckpt.format.catalog import committed_steps, step_name
from shardckpt.format.layout import Layout
from shardckpt.format.manifest import read_manifest
from shardckpt.retention.deletion import retire_checkpoints
from shardckpt.retention.garbage import GcReport, collect_garbage
from shardckpt.store import LocalStore, open_store
from shardckpt.store.tiered import TieredStore

logger = logging.getLogger(__name__)


def _log_stats(kind: str, stats: SaveStats | LoadStats) -> None:
    figures = asdict(stats)
    figures.update(
        {
            k: round(getattr(stats, k), 3)
            for k in ("snapshot_gbps", "upload_gbps", "gbps")
            if hasattr(stats, k)
        }
    )
    logger.info("shardckpt %s %s", kind, json.dumps(figures, sort_keys=True))


class Checkpointer:
    """Save every N steps, resume from the latest, keep the last N.

    ``root_uri``: where checkpoints live, one per step (``<root>/step-0000000100/``).
    ``keep_last``: after each commit, delete all but the newest N committed checkpoints.
    ``process_group``: the ranks that checkpoint together (default: the whole world); a
    dedicated gloo group over them is created here, so every rank must construct the
    Checkpointer at the same point. ``when_busy``: what ``save`` does while the previous
    save is still uploading: ``"wait"`` (default) or ``"skip"`` (with a warning).
    ``collective_timeout``: seconds a background collective may wait for a peer.
    ``local_copy``: a local directory (e.g. NVMe) that keeps this node's shards of the newest
    checkpoint, so a restart on the same node loads from disk while S3 holds the durable
    copy; shards missing there are read from S3.
    ``on_stats``: called with a :class:`SaveStats` after each commit (from the background
    thread) and a :class:`LoadStats` after each load, e.g. to log to TensorBoard or W&B;
    each is also logged as one JSON line at INFO.
    ``overlap``: let the device-to-host copy run on while the next forward/backward runs;
    the optimizer(s) given to :meth:`attach` wait for it before their next ``step``. Safe
    when nothing but those optimizers modifies the saved tensors in between (not, e.g.,
    BatchNorm running statistics updated by forward, or manual in-place edits of weights).
    ``incremental``: upload only items whose bytes the newest committed checkpoint does not
    already hold (frozen layers, unchanged buffers); the manifest references the others
    where they are, and retention and gc keep data while any manifest references it.
    ``shared_load``: data every rank loads (a replicated model) is fetched once per job and
    broadcast over the Checkpointer's gloo group instead of fetched by every rank.
    Other options go to :class:`~shardckpt.dcp.writer.WriterOptions` (``object_size``,
    ``num_threads``, ``fanout``) and the store (``endpoint``, ``region``, ...).
    """

    def __init__(
        self,
        root_uri: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        when_busy: str = "wait",
        collective_timeout: float = 1800.0,
        trusted: bool = False,
        overlap: bool = False,
        on_stats: Callable[[SaveStats | LoadStats], None] | None = None,
        local_copy: str | os.PathLike[str] | None = None,
        incremental: bool = False,
        shared_load: bool = False,
        **options: Any,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        if when_busy not in ("wait", "skip"):
            raise ValueError(f"when_busy must be 'wait' or 'skip', got {when_busy!r}")
        self.root_uri = os.fspath(root_uri)
        self.keep_last = keep_last
        self.when_busy = when_busy
        self.trusted = trusted
        self.overlap = overlap
        self.on_stats = on_stats
        self.incremental = incremental
        self.shared_load = shared_load
        self._hooks: list[Any] = []
        self._snapshot_wait: Callable[[], None] | None = None
        self.writer_options, store_options = split_options(options)
        self.store = open_store(self.root_uri, **store_options)
        if local_copy is not None:
            self.store = TieredStore(self.store, LocalStore(os.fspath(local_copy), fsync=False))
        self._group = _dedicated_group(process_group, collective_timeout)
        # Main-thread collectives (preemption checks) get their own group: sharing the
        # save's group with the background thread could interleave collectives and hang.
        self._preemption = Preemption(_dedicated_group(process_group, collective_timeout))
        self.rank = dist.get_rank(self._group) if self._group is not None else 0
        self.staging = HostStaging()
        self._saves = SaveQueue("shardckpt-save")
        self._planner = ShardSavePlanner(enable_plan_caching=True, pause_gc=True)
        self._known_steps = set(self.steps())
        self.history: list[SaveStats] = []
        self._closed = False

    # -- saving ----------------------------------------------------------------------------
    def save(self, step: int, state_dict: dict[str, Any]) -> SaveHandle:
        """Snapshot ``state_dict`` and return; upload and commit continue in the background.

        Raises the error of an earlier background save, if there was one. Every rank must
        call ``save`` with the same steps in the same order.
        """
        self._check_open()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self._saves.raise_error()
        if step in self._known_steps:
            raise CheckpointExistsError(
                f"{self.store.uri(step_name(step))} already exists (step {step} was saved)"
            )
        if self._saves.busy():
            if self.when_busy == "skip":
                assert self._saves.last is not None
                warnings.warn(
                    f"shardckpt: skipping save of step {step}: {self._saves.last.what} is still uploading",
                    stacklevel=2,
                )
                return SaveHandle(step, None, SaveStats(step, self.rank, 0.0, 0))
            self.wait()
        started = time.perf_counter()
        if self.overlap:
            if not self._hooks:
                raise RuntimeError(
                    "overlap=True needs the optimizer: call checkpointer.attach(optimizer) first"
                )
            staged, copied = self.staging.snapshot_async(state_dict)
            self._snapshot_wait = copied
        else:
            staged, copied = self.staging.snapshot(state_dict), _nothing
        blocked = time.perf_counter() - started
        stats = SaveStats(step, self.rank, blocked, self.staging.nbytes, snapshot_s=blocked)
        self._known_steps.add(step)  # taken from now on, unless the save fails (_save_step)
        save = functools.partial(self._save_step, step, staged, copied, stats, started)
        uri = self.store.uri(step_name(step))
        return SaveHandle(
            step, self._saves.submit(save, f"the save of step {step} to {uri}", uri), stats
        )

    def attach(self, optimizer: Any) -> None:
        """In overlap mode, make ``optimizer.step`` wait until the snapshot is copied."""
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.wait_snapshot()))

    def wait_snapshot(self) -> None:
        """Block until the last save's snapshot is complete (a no-op without overlap)."""
        if self._snapshot_wait is not None:
            wait, self._snapshot_wait = self._snapshot_wait, None
            wait()

    def _save_step(
        self,
        step: int,
        staged: dict[str, Any],
        copied: Callable[[], None],
        stats: SaveStats,
        started: float,
        switch: AbortSwitch,
    ) -> None:
        """The background part of saving ``step``; on failure the step is free again."""
        try:
            copied()
            stats.snapshot_s = time.perf_counter() - started
            before = self.store.stats.copy()
            writer = write_checkpoint(
                self.store,
                Layout(step_name(step), self.writer_options.fanout),
                staged,
                what=f"save of step {step} to {self.store.uri(step_name(step))}",
                options=self.writer_options,
                switch=switch,
                attributes={"step": step},
                base=self._base_for(step),
                planner=self._planner,
                group=self._group,
                rank=self.rank,
            )
        except BaseException:
            self._known_steps.discard(step)  # a failed save leaves its step free to save again
            raise
        finally:
            self._planner.resume_gc()
        if self.keep_last is not None and self.rank == 0:
            tidy_after_commit("retention could not delete old checkpoints", self._retire_expired)
        if isinstance(self.store, TieredStore):
            self.store.keep_only(step_name(step) + "/")
        now = time.perf_counter()
        stats.total_s, stats.upload_s = now - started, now - started - stats.snapshot_s
        stats.objects = len(writer.last_stream.objects) if writer.last_stream else 0
        stats.reused_bytes = writer.last_reused
        spent = self.store.stats.copy() - before
        stats.requests, stats.retries, stats.throttled = (
            spent.requests,
            spent.retries,
            spent.throttled,
        )
        self.history.append(stats)
        _log_stats("save", stats)
        if self.on_stats is not None:
            self.on_stats(stats)

    def _base_for(self, step: int) -> ContentIndex | None:
        """For an incremental save: the newest committed checkpoint before ``step``, by
        content. Retention always keeps it, so what this save reuses cannot vanish."""
        if not self.incremental:
            return None
        earlier = [s for s in self.steps() if s < step]
        if not earlier:
            return ContentIndex()
        name = step_name(earlier[-1])
        return ContentIndex(read_manifest(self.store, Layout(name)), name)

    def wait(self) -> None:
        """Block until the save in flight is committed; raise its error, once (not again
        if the caller already got it from the save's own handle). Ctrl-C: the first lets
        the save finish (then raises ``KeyboardInterrupt``), the second aborts it."""
        self._saves.wait()

    # -- discovery --------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, oldest first (checkpoints without a manifest are ignored)."""
        return committed_steps(self.store)

    def latest(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    # -- loading ----------------------------------------------------------------------------
    def load(self, state_dict: dict[str, Any], step: int | None = None) -> int:
        """Load checkpoint ``step`` (default: the latest) into ``state_dict`` in place;
        return the step loaded. Resharding to another world size works as in DCP."""
        self._check_open()
        self.wait()  # a background save's collectives must not interleave with ours
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointNotFoundError(f"no committed checkpoint under {self.store.uri()}")
        elif not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        layout = Layout(step_name(step))
        reader = ShardReader.for_checkpoint(
            self.store,
            layout,
            self.store.uri(step_name(step)),
            trusted=self.trusted,
            shared_fetch=self.shared_load,
            process_group=self._group,
        )
        reader.manifest = read_manifest(self.store, layout)
        check_state_dict(state_dict, reader.manifest.metadata, reader.uri)
        started, before = time.perf_counter(), self.store.stats.copy()
        try:
            with dcp_call(self._group):
                dcp.load(state_dict, storage_reader=reader, process_group=self._group)
        except CheckpointException as exc:
            raise from_dcp(exc, f"load of {reader.uri}", CheckpointError)  # noqa: B904 (has its cause)
        spent = self.store.stats.copy() - before
        stats = LoadStats(
            step,
            self.rank,
            time.perf_counter() - started,
            spent.bytes_got,
            spent.requests,
            spent.retries,
            spent.throttled,
        )
        _log_stats("load", stats)
        if self.on_stats is not None:
            self.on_stats(stats)
        return step

    # -- retention --------------------------------------------------------------------------
    def _retire_expired(self) -> None:
        assert self.keep_last is not None
        expired = self.steps()[: -self.keep_last]
        if expired:
            retire_checkpoints(self.store, [Layout(step_name(s)) for s in expired])

    def gc(self, *, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport | None:
        """Collect garbage under the root (rank 0 only; other ranks return None): data of
        failed saves older than ``grace_s``, unfinished uploads, checkpoints beyond keep_last.
        Waits for the save in flight first (raising its error), so its data is never taken
        for a failed save's, whatever the grace period."""
        self.wait()
        if self.rank != 0:
            return None
        return collect_garbage(
            self.store, grace_s=grace_s, keep_last=self.keep_last, dry_run=dry_run
        )

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the save in flight, then free threads and buffers."""
        self._close(interrupted=False)

    def _close(self, *, interrupted: bool) -> None:
        if self._closed:
            return
        try:
            self._saves.wait(interrupted=interrupted)
        finally:
            self._closed = True
            for hook in self._hooks:
                hook.remove()
            self._preemption.close()
            self._saves.close()
            self.staging.close()
            self.store.close()
            if self._group is not None:
                dist.destroy_process_group(self._group)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Checkpointer is closed")

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        # Leaving on Ctrl-C: say that the save in flight finishes, and how to abort it.
        self._close(interrupted=isinstance(exc, KeyboardInterrupt))

    def install_sigterm_handler(self) -> None:
        """Opt-in preemption handling: on SIGTERM, only note it; the training loop asks
        :meth:`preempted` at a step boundary, takes a final save and exits. (Saving inside a
        signal handler could start collectives at different steps on different ranks.)
        A Python handler installed before is still called after ours, and put back by
        :meth:`close`. Call from the main thread."""
        self._preemption.install()

    def preempted(self) -> bool:
        """Whether any rank has received SIGTERM. All ranks must call this at the same
        steps: they agree through a small collective on a control group of their own, so
        every rank stops after the same step."""
        return self._preemption.agreed()


def _nothing() -> None:
    return None


def _dedicated_group(group: dist.ProcessGroup | None, timeout: float) -> dist.ProcessGroup | None:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    ranks = None if group is None else dist.get_process_group_ranks(group)
    return dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout))
