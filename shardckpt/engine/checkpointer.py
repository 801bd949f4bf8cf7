"""``Checkpointer``: asynchronous, atomic checkpoints for the training loop.

``save(step, state)`` blocks only for the snapshot into host buffers; upload and commit run
on one background thread. Coordination of a background save uses a dedicated gloo group
created once at start-up, so it never touches the training's (NCCL) group, and at most one
save is in flight, so the collectives of consecutive saves never interleave.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt._util.abort import AbortSwitch, wait_or_abort
from shardckpt._util.quiet import single_process_dcp
from shardckpt.dcp.incremental import ContentIndex
from shardckpt.dcp.load_checks import check_state_dict
from shardckpt.dcp.planner import ShardSavePlanner
from shardckpt.dcp.reader import ShardReader
from shardckpt.dcp.staging import HostStaging
from shardckpt.dcp.writer import ShardWriter, _split_options
from shardckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    SaveAbortedError,
    SaveFailedError,
    describe_failures,
    first_cause,
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


@dataclass
class SaveStats:
    """Figures of one save on this rank. Seconds: ``blocked_s`` (the training step was
    blocked), ``snapshot_s`` (until the host copy was complete; equals ``blocked_s`` unless
    overlapping), ``upload_s`` (upload and commit), ``total_s`` (save call to committed).
    ``bytes`` and ``objects`` this rank wrote; ``reused_bytes`` of them an incremental save
    did not upload (an earlier checkpoint holds them); ``requests``, ``retries`` and
    ``throttled`` (503 SlowDown replies) this save cost the store, retention included."""

    step: int
    rank: int
    blocked_s: float
    bytes: int
    snapshot_s: float = 0.0
    upload_s: float = 0.0
    total_s: float = 0.0
    objects: int = 0
    reused_bytes: int = 0
    requests: int = 0
    retries: int = 0
    throttled: int = 0

    @property
    def snapshot_gbps(self) -> float:
        return self.bytes / self.snapshot_s / 1e9 if self.snapshot_s else 0.0

    @property
    def upload_gbps(self) -> float:
        return self.bytes / self.upload_s / 1e9 if self.upload_s else 0.0


@dataclass
class LoadStats:
    """Figures of one load on this rank: seconds, bytes read, store requests and retries."""

    step: int
    rank: int
    seconds: float
    bytes: int
    requests: int
    retries: int
    throttled: int

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


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


class SaveHandle:
    """The handle ``save`` returns: ``wait()`` blocks until committed (raising its error),
    ``done()`` tells whether it has finished. Ctrl-C while waiting: see ``shardckpt._util.abort``
    (the first lets the save finish, the second aborts it)."""

    def __init__(
        self,
        step: int,
        future: Future[None] | None,
        stats: SaveStats,
        switch: AbortSwitch | None = None,
        uri: str = "",
    ) -> None:
        self.step = step
        self.stats = stats
        self._future = future
        self._switch = switch or AbortSwitch()
        self._what = f"the save of step {step} to {uri}"
        self.raised = False  # its error reached the caller through this handle already

    @property
    def skipped(self) -> bool:
        return self._future is None

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self) -> None:
        self._wait(interrupted=False)

    def _wait(self, *, interrupted: bool) -> None:
        """``interrupted``: a Ctrl-C arrived before the wait began (see ``wait_or_abort``)."""
        if self._future is not None:
            try:
                wait_or_abort(self._future, self._switch, self._what, interrupted=interrupted)
            except KeyboardInterrupt:
                raise  # not the save's error: it is still to be raised, or was aborted
            except BaseException:
                self.raised = True
                raise


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
        self.writer_options, store_options = _split_options(options)
        self.store = open_store(self.root_uri, **store_options)
        if local_copy is not None:
            self.store = TieredStore(self.store, LocalStore(os.fspath(local_copy), fsync=False))
        self._group = _dedicated_group(process_group, collective_timeout)
        # Main-thread collectives (preemption checks) get their own group: sharing the
        # save's group with the background thread could interleave collectives and hang.
        self._control = _dedicated_group(process_group, collective_timeout)
        self._sigterm = False
        self._previous_sigterm: Any = None  # the SIGTERM handler ours replaced, restored on close
        self.rank = dist.get_rank(self._group) if self._group is not None else 0
        self.staging = HostStaging()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-save")
        self._planner = ShardSavePlanner(enable_plan_caching=True, pause_gc=True)
        self._pending: SaveHandle | None = None
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
        self._raise_background_error()
        if step in self._known_steps:
            raise CheckpointExistsError(
                f"{self.store.uri(step_name(step))} already exists (step {step} was saved)"
            )
        if self._pending is not None and not self._pending.done():
            if self.when_busy == "skip":
                warnings.warn(
                    f"shardckpt: skipping save of step {step}: step {self._pending.step} is still uploading",
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
        self._known_steps.add(step)  # taken from now on, unless the save fails (see _upload)
        switch = AbortSwitch()
        save = functools.partial(self._save_step, step, staged, copied, stats, started, switch)
        future = self._executor.submit(self._upload, step, switch, save)
        self._pending = SaveHandle(step, future, stats, switch, self.store.uri(step_name(step)))
        return self._pending

    def attach(self, optimizer: Any) -> None:
        """In overlap mode, make ``optimizer.step`` wait until the snapshot is copied."""
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.wait_snapshot()))

    def wait_snapshot(self) -> None:
        """Block until the last save's snapshot is complete (a no-op without overlap)."""
        if self._snapshot_wait is not None:
            wait, self._snapshot_wait = self._snapshot_wait, None
            wait()

    def _upload(self, step: int, switch: AbortSwitch, save: Callable[[], None]) -> None:
        """Run ``save`` (the background part of saving ``step``); on failure free the step."""
        try:
            save()
        except BaseException as exc:
            self._known_steps.discard(step)  # a failed save leaves its step free to save again
            if switch.event.is_set():  # whatever the abort made fail, DCP's wrapping included
                raise SaveAbortedError(
                    f"the save of step {step} to {self.store.uri(step_name(step))} was aborted "
                    "(Ctrl-C): nothing was committed; gc removes what it uploaded"
                ) from exc
            raise

    def _save_step(
        self,
        step: int,
        staged: dict[str, Any],
        copied: Callable[[], None],
        stats: SaveStats,
        started: float,
        switch: AbortSwitch,
    ) -> None:
        copied()
        stats.snapshot_s = time.perf_counter() - started
        before = self.store.stats.copy()
        layout = Layout(step_name(step), self.writer_options.fanout)
        writer = ShardWriter._for_checkpoint(
            self.store,
            layout,
            self.store.uri(step_name(step)),
            {"step": step},
            self.writer_options,
            self._base_for(step),
            switch,
        )
        try:
            with self._dcp_call():
                dcp.save(
                    staged, storage_writer=writer, planner=self._planner, process_group=self._group
                )
        except CheckpointException as exc:
            raise SaveFailedError(
                f"save of step {step} to {self.store.uri(step_name(step))} failed: {describe_failures(exc)}"
            ) from first_cause(exc)
        except Exception as exc:
            raise SaveFailedError(
                f"save of step {step} to {self.store.uri(step_name(step))} failed on rank {self.rank}: {exc}"
            ) from exc
        finally:
            self._planner.resume_gc()
        if self.keep_last is not None and self.rank == 0:
            self._apply_retention()
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

    def _dcp_call(self) -> contextlib.AbstractContextManager[None]:
        """Around our DCP calls: without a process group they run in one process on purpose."""
        return single_process_dcp() if self._group is None else contextlib.nullcontext()

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

    def _raise_background_error(self) -> None:
        """Raise the error of a finished background save, once."""
        if self._pending is not None and self._pending.done():
            pending, self._pending = self._pending, None
            if not pending.raised:
                pending.wait()

    def wait(self) -> None:
        """Block until the save in flight is committed; raise its error, once (not again
        if the caller already got it from the save's own handle). Ctrl-C: the first lets
        the save finish (then raises ``KeyboardInterrupt``), the second aborts it."""
        self._wait(interrupted=False)

    def _wait(self, *, interrupted: bool) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            if not pending.raised:
                pending._wait(interrupted=interrupted)

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
        reader = ShardReader._for_checkpoint(
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
            with self._dcp_call():
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
    def _apply_retention(self) -> None:
        assert self.keep_last is not None
        try:
            expired = self.steps()[: -self.keep_last]
            if expired:
                retire_checkpoints(self.store, [Layout(step_name(s)) for s in expired])
        except Exception as exc:  # the checkpoint stays; gc can remove it later
            warnings.warn(
                f"shardckpt: retention could not delete old checkpoints: {exc}", stacklevel=1
            )

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
            self._wait(interrupted=interrupted)
        finally:
            self._closed = True
            for hook in self._hooks:
                hook.remove()
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None
            self._executor.shutdown(wait=True)
            self.staging.close()
            self.store.close()
            for group in (self._group, self._control):
                if group is not None:
                    dist.destroy_process_group(group)

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
        if self._previous_sigterm is not None:
            return  # installed already
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            logger.warning(
                "shardckpt: SIGTERM received: the loop will save and stop at the next check"
            )
            self._sigterm = True
            if callable(previous):  # chain to the handler we replaced (not SIG_DFL / SIG_IGN)
                previous(signum, frame)

        signal.signal(signal.SIGTERM, handler)
        # None: installed from outside Python; the default is what we can restore
        self._previous_sigterm = signal.SIG_DFL if previous is None else previous

    def preempted(self) -> bool:
        """Whether any rank has received SIGTERM. All ranks must call this at the same
        steps: they agree through a small collective on a control group of their own, so
        every rank stops after the same step."""
        if self._control is None:
            return self._sigterm
        flag = torch.tensor([int(self._sigterm)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._control)
        return bool(flag.item())


def _nothing() -> None:
    return None


def _dedicated_group(group: dist.ProcessGroup | None, timeout: float) -> dist.ProcessGroup | None:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    ranks = None if group is None else dist.get_process_group_ranks(group)
    return dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout))
