"""What each rank does: make its state, warm every system up, then run the timed reps
(systems alternating A B A B within each rep), verify every load bit for bit, and optionally
count each system's S3 requests in an untimed pass through the counting relay."""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import systems as systems_module
from benchmarks.counting import RequestCounter
from benchmarks.measure import Sample, measure
from benchmarks.s3util import Target, delete_prefix, split_uri
from benchmarks.workloads import MiB, Workload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything a rank needs: the ``workload``, the ``systems`` by name, ``reps``, the
    server ``endpoint`` and ``bucket``, a ``run_id`` (key prefix), the local ``scratch``
    folder, ``cap_seconds`` (a system whose save+load takes longer is not repeated), whether
    to ``count_requests``, the s3torchconnector reader variant, the kind of ``server``, and
    the URL that makes it reclaim deleted objects' space (SeaweedFS), called untimed after
    each save+load's objects are deleted."""

    workload: Workload
    systems: tuple[str, ...]
    reps: int
    endpoint: str
    bucket: str
    run_id: str
    scratch: str
    cap_seconds: float
    count_requests: bool
    connector_reader: str = "dcp_optimized"
    server: str = "seaweedfs"
    reclaim_url: str | None = None


@dataclass
class RankLog:
    """What rank 0 returns: per system, every successful rep's samples of every rank, the
    request counts, the systems that were capped or failed (with why), and how each works."""

    reps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    capped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)


def _gather(value: object) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    """The first key whose bytes differ, or None if all are bit-identical."""
    for key in sorted(expected):
        a, b = expected[key].reshape(-1).view(torch.uint8), got[key].reshape(-1).view(torch.uint8)
        if not torch.equal(a, b):
            return key
    return None


class _Runner:
    def __init__(self, rank: int, plan: Plan) -> None:
        self.rank, self.plan = rank, plan
        self.started = time.monotonic()
        self.workload = plan.workload
        self.state = self.workload.make_state(rank)
        self.dest = {k: torch.empty_like(v) for k, v in self.state.items()}
        target = Target(plan.endpoint, plan.bucket, rank, self.workload.world_size, plan.scratch)
        self.client = target.client()
        self.systems = systems_module.build(
            list(plan.systems), target, plan.connector_reader, plan.server
        )

    def progress(self, message: str, *args: object) -> None:
        """Rank 0 only: ``message`` on stderr, prefixed with the workload and the seconds
        since this rank started (so a long run shows where it is)."""
        if self.rank == 0:
            elapsed = time.monotonic() - self.started
            logger.info("%s [%5.0fs] " + message, self.workload.label, elapsed, *args)

    def uri(self, system: str, tag: str) -> str:
        return f"s3://{self.plan.bucket}/{self.plan.run_id}/{self.workload.label}/{system}/{tag}"

    def once(
        self,
        system: systems_module.System,
        uri: str,
        state: dict[str, torch.Tensor],
        mark: Callable[[], None] = lambda: None,
    ) -> Outcome:
        """One timed save and one timed, verified load of ``state``; every rank is between
        the same two barriers around each call. ``mark`` runs before the save, between
        save and load, and after the load (with every rank idle). A failure on any rank (an
        exception, or bytes that differ) is the outcome's ``error`` on every rank."""
        dest = (
            self.dest if state is self.state else {k: torch.empty_like(v) for k, v in state.items()}
        )
        for t in dest.values():
            t.zero_()  # untimed: also faults the pages in, for every system alike
        system.prepare_save(state, uri)
        dist.barrier()
        mark()
        outcome = Outcome()
        outcome.save, error = _attempt(lambda: system.save(state, uri))
        dist.barrier()
        mark()
        outcome.error = _first_error("save", _gather(error))
        if outcome.error is None:
            outcome.load, error = _attempt(lambda: system.load(dest, uri))
            dist.barrier()
            mark()
            outcome.error = _first_error("load", _gather(error))
        if outcome.error is None:
            wrong = [(r, key) for r, key in enumerate(_gather(_mismatch(state, dest))) if key]
            if wrong:
                outcome.error = f"loaded wrong bytes: (rank, first differing key) {wrong}"
        system.cleanup(uri)
        dist.barrier()
        if self.rank == 0 and system.uses_s3:
            bucket, prefix = split_uri(uri)
            delete_prefix(self.client, bucket, prefix + "/")
            if self.plan.reclaim_url:
                urllib.request.urlopen(self.plan.reclaim_url, timeout=300).read()
        dist.barrier()
        return outcome

    def warm_up(self, log: RankLog) -> None:
        self.progress("warming up %d systems", len(self.systems))
        tiny = {f"rank{self.rank}.warm{i}": torch.randn(MiB // 4) for i in range(2)}
        for system in self.systems:
            outcome = self.once(system, self.uri(system.name, "warmup"), tiny)
            if outcome.error is not None:
                self.fail(log, system.name, f"warm-up: {outcome.error}")

    def fail(self, log: RankLog, name: str, error: str) -> None:
        log.failed[name] = error
        if self.rank == 0:
            logger.error("%s %s FAILED (not run again): %s", self.workload.label, name, error)

    def timed(self, log: RankLog) -> None:
        total, done = self.plan.reps * len(self.systems), 0
        for rep in range(self.plan.reps):
            for system in self.systems:
                done += 1
                if system.name in log.capped or system.name in log.failed:
                    continue
                outcome = self.once(system, self.uri(system.name, f"rep{rep}"), self.state)
                if outcome.error is not None:
                    self.fail(log, system.name, f"rep {rep}: {outcome.error}")
                    continue
                assert outcome.save is not None and outcome.load is not None
                ranks = _gather({"save": outcome.save.to_dict(), "load": outcome.load.to_dict()})
                log.reps.setdefault(system.name, []).append(
                    # bit_exact: every rank's load was compared byte for byte (see ``once``)
                    {
                        "rep": rep,
                        "loadavg_1min": os.getloadavg()[0],
                        "bit_exact": True,
                        "ranks": ranks,
                    }
                )
                save_s = max(r["save"]["seconds"] for r in ranks)
                load_s = max(r["load"]["seconds"] for r in ranks)
                self.progress(
                    "%3d/%d %-10s rep %d: save %7.2fs  load %7.2fs  bytes OK",
                    done,
                    total,
                    system.name,
                    rep,
                    save_s,
                    load_s,
                )
                if save_s + load_s > self.plan.cap_seconds and rep + 1 < self.plan.reps:
                    log.capped[system.name] = (
                        f"save+load took {save_s + load_s:.0f}s > cap {self.plan.cap_seconds:.0f}s; ran {rep + 1} rep(s)"
                    )

    def count(self, log: RankLog) -> None:
        """One more, untimed save+load per S3 system through the counting relay (which runs
        on rank 0 and sees every rank's requests). Systems that failed are left out."""
        self.progress("counting requests (one untimed save+load per S3 system)")
        counter = RequestCounter(self.plan.endpoint) if self.rank == 0 else None
        endpoint = [counter.start() if counter is not None else None]
        dist.broadcast_object_list(endpoint, src=0)
        target = Target(
            endpoint[0], self.plan.bucket, self.rank, self.workload.world_size, self.plan.scratch
        )
        try:
            for system in systems_module.build(
                list(self.plan.systems), target, self.plan.connector_reader, self.plan.server
            ):
                if not system.uses_s3 or system.name in log.failed:
                    continue
                marks: list[Counter[str]] = []
                outcome = self.once(
                    system,
                    self.uri(system.name, "count"),
                    self.state,
                    lambda m=marks: m.append(_snapshot(counter)),
                )
                counts: dict[str, Any] = {}
                for op, i in (("save", 1), ("load", 2)):
                    if len(marks) > i:
                        counts[op] = dict(marks[i] - marks[i - 1])
                if outcome.error is not None:
                    counts["error"] = outcome.error
                log.requests[system.name] = counts
        finally:
            if counter is not None:
                counter.stop()


@dataclass
class Outcome:
    """One save+load: each call's :class:`Sample` (None if not run or failed) and the first
    failure of any rank."""

    save: Sample | None = None
    load: Sample | None = None
    error: str | None = None


def _attempt(call: Callable[[], dict[str, float] | None]) -> tuple[Sample | None, str | None]:
    try:
        return measure(call), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        return None, f"{type(exc).__name__}: {_last_line(exc)}"


def _last_line(exc: BaseException) -> str:
    """The root cause's message, short (DCP wraps rank failures in long tracebacks)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else repr(exc))[:400]


def _first_error(op: str, errors: list[str | None]) -> str | None:
    for rank, error in enumerate(errors):
        if error is not None:
            return f"{op} failed on rank {rank}: {error}"
    return None


def _snapshot(counter: RequestCounter | None) -> Counter[str]:
    return counter.snapshot() if counter is not None else Counter()


def rank_main(rank: int, world_size: int, plan: Plan) -> RankLog | None:
    """Entry point of every rank (see :func:`benchmarks.spawn.run_ranks`)."""
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    for noisy in ("shardckpt", "botocore", "boto3", "s3torchconnector"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    assert world_size == plan.workload.world_size
    runner = _Runner(rank, plan)
    log = RankLog(descriptions={s.name: s.description for s in runner.systems})
    runner.warm_up(log)
    runner.timed(log)
    if plan.count_requests:
        runner.count(log)
    runner.progress("done")
    return log if rank == 0 else None
