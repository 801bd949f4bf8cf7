"""Worker processes of the reliability suite, forked from one warm *zygote*.

The zygote (``python -m tests.reliability.workers``) imports torch and shardckpt once, then
forks workers on command, one JSON line on stdin each:

- ``{"op": "job", ...}`` (crash test): a 2-rank gloo job in a process group of its own (so
  the driver can SIGKILL it whole) that commits steps 1 and 2 through a Checkpointer, then
  saves step 3. Rank 0 reports ``go`` (with step 2's timeline: when the snapshot returned,
  when its upload ended, when the manifest was committed, in seconds from the save call)
  right before it calls ``save(3)``, then ``snapshot`` when that returns and ``committed``.
- ``{"op": "verify", ...}`` (crash test): a fresh process that inspects what a killed job
  left, loads what is committed, collects garbage and inspects again; it reports facts.
- ``{"op": "race", ...}`` (concurrent writers): two single-process jobs that save the same
  checkpoints at the same moments and report who won each.

Forking a warm zygote costs milliseconds where spawning a torch process costs seconds, which
is what makes dozens of kill points affordable. Every message is one JSON line on stdout,
written with a single ``os.write`` so lines from several processes never interleave;
:class:`Zygote` is the driver's side.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt import Checkpointer, ShardReader, ShardWriter
from shardckpt.format.catalog import step_name
from shardckpt.format.layout import MANIFEST_NAME, Layout
from shardckpt.format.manifest import read_manifest
from shardckpt.retention.garbage import collect_garbage
from shardckpt.store import open_store
from shardckpt.tools.verify import verify_checkpoint
from tests.writer.states import fingerprint

MiB = 1 << 20
COMMITTED, SAVING = 2, 3  # the job has committed step 2 and is saving step 3 when killed


def crash_state(seed: int, step: int, mib: float) -> dict[str, Any]:
    """The state of ``step``: four tensors of ``mib`` MiB in all, and a non-tensor value."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    n = max(1, int(mib * MiB) // 16)
    return {
        "model": {f"w{i}": torch.randn(n, generator=g) for i in range(3)},
        "optim": {"m": torch.randint(-9, 9, (n,), generator=g, dtype=torch.int32)},
        "meta": {"step": step, "seed": seed},
    }


def emit(**message: Any) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def _options(cmd: dict[str, Any]) -> dict[str, Any]:
    return {"object_size": MiB, "num_threads": 2, **cmd.get("store_options", {})}


class _Timeline(logging.Handler):
    """Times (from ``start``) at which this rank's writer finished uploading and committed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.start = time.monotonic()
        self.marks: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        mark = (
            "uploaded"
            if " wrote " in text
            else "committed"
            if text.startswith("committed ")
            else None
        )
        if mark is not None:
            self.marks[mark] = time.monotonic() - self.start


def _rank(cmd: dict[str, Any], rank: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cmd["port"]), RANK=str(rank), WORLD_SIZE="2"
    )
    dist.init_process_group("gloo", rank=rank, world_size=2)
    timeline = _Timeline()
    writer_log = logging.getLogger("shardckpt.dcp")  # the writer and its commit
    writer_log.setLevel(logging.DEBUG)
    writer_log.addHandler(timeline)
    seed, mib = cmd["seed"], cmd["mib"]
    ck = Checkpointer(cmd["root"], **_options(cmd))
    ck.save(1, crash_state(seed, 1, mib)).wait()  # warms the planner's cache and the buffers
    state = crash_state(seed, COMMITTED, mib)
    timeline.start = time.monotonic()
    ck.save(COMMITTED, state)
    snapshot = time.monotonic() - timeline.start
    ck.wait()
    state = crash_state(seed, SAVING, mib)
    dist.barrier()
    if rank == 0:
        emit(event="go", job=cmd["job"], timeline={"snapshot": snapshot, **timeline.marks})
    ck.save(SAVING, state)
    if rank == 0:
        emit(event="snapshot", job=cmd["job"])
    ck.wait()
    if rank == 0:
        emit(event="committed", job=cmd["job"])
    ck.close()
    dist.destroy_process_group()


def _fork_job(cmd: dict[str, Any]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        cmd["port"] = s.getsockname()[1]
    pids: list[int] = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.setpgid(0, 0 if rank == 0 else pids[0])
                _rank(cmd, rank)
            except BaseException:
                emit(event="error", job=cmd["job"], rank=rank, error=traceback.format_exc())
                code = 1
            os._exit(code)
        os.setpgid(pid, pids[0] if pids else pid)  # both sides set it: no race with kill
        pids.append(pid)
    emit(event="started", job=cmd["job"], pgid=pids[0])
    codes = [os.waitpid(pid, 0)[1] for pid in pids]
    emit(event="exited", job=cmd["job"], status=[os.waitstatus_to_exitcode(c) for c in codes])


# -- verification --------------------------------------------------------------------------
def _loads_exact(ck: Checkpointer, step: int, seed: int, mib: float) -> bool:
    out = crash_state(seed + 1, step, mib)  # other values, same shapes
    out["meta"] = {"step": -1, "seed": -1}
    ck.load(out, step=step)
    return fingerprint(out) == fingerprint(crash_state(seed, step, mib))


def _inspect(cmd: dict[str, Any]) -> dict[str, Any]:
    """What is on the store, and how each committed step loads, seen from a fresh process."""
    seed, mib = cmd["seed"], cmd["mib"]
    store = open_store(cmd["root"], **cmd.get("store_options", {}))
    saving = step_name(SAVING)
    facts: dict[str, Any] = {
        "keys": sorted(o.key for o in store.list(f"{saving}/")),
        "pending": sorted(u.key for u in store.list_pending_uploads("")),
    }
    with Checkpointer(cmd["root"], **_options(cmd)) as ck:
        facts["steps"], facts["latest"] = ck.steps(), ck.latest()
        facts["exact"] = {str(s): _loads_exact(ck, s, seed, mib) for s in facts["steps"]}
        facts["verified"] = {
            str(s): verify_checkpoint(store, Layout(step_name(s))).ok for s in facts["steps"]
        }
        if SAVING not in facts["steps"]:
            facts["load_error"] = _error_of(lambda: _loads_exact(ck, SAVING, seed, mib))
            uri = f"{cmd['root']}/{saving}"
            facts["reader_error"] = _error_of(
                lambda: ShardReader(uri, **cmd.get("store_options", {})).read_metadata()
            )
            # dcp.load turns a failed read_metadata into an AssertionError carrying our message.
            reader = ShardReader(uri, **cmd.get("store_options", {}))
            facts["dcp_error"] = _error_of(
                lambda: dcp.load(crash_state(seed, SAVING, mib), storage_reader=reader)
            )
    manifest = read_manifest(store, Layout(step_name(COMMITTED)))
    facts["expected_objects"] = sorted(o.key.rsplit("/", 1)[1] for o in manifest.objects)
    facts["manifest_tmp"] = any(p.endswith(f"{saving}/{MANIFEST_NAME}") for p in facts["pending"])
    store.close()
    return facts


def _error_of(fn: Any) -> str | None:
    """``"TypeName: message"`` of what ``fn`` raises (for DCP's wrapper: of its first cause)."""
    try:
        fn()
    except BaseException as exc:
        failures = getattr(exc, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else exc
        return f"{type(cause).__name__}: {cause}"
    return None


def _verify(cmd: dict[str, Any]) -> dict[str, Any]:
    before = _inspect(cmd)
    store = open_store(cmd["root"], **cmd.get("store_options", {}))
    report = collect_garbage(store, grace_s=0)
    store.close()
    return {
        "before": before,
        "gc_objects": len(report.garbage_objects),
        "gc_uploads": len(report.aborted_uploads),
        "after": _inspect(cmd),
    }


def _fork_verify(cmd: dict[str, Any]) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            emit(event="verified", job=cmd["job"], facts=_verify(cmd))
            code = 0
        except BaseException:
            emit(event="error", job=cmd["job"], rank=-1, error=traceback.format_exc())
            code = 1
        os._exit(code)
    os.waitpid(pid, 0)


# -- concurrent writers ---------------------------------------------------------------------
def race_state(job: int, round_: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1000 * job + round_)
    return {
        "w": torch.randn(3 * MiB // 4, generator=g),
        "b": torch.randn(100, generator=g),
        "meta": {"job": job},
    }


class _HeldAtCommit(ShardWriter):
    """A writer that waits for the other job at the commit, once its uploads are durable."""

    barrier: Any = None

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.barrier.wait(timeout=60)
        super().finish(metadata, results)


def _race(job: int, rounds: list[list[Any]], barrier: Any) -> None:
    for i, (uri, options, held) in enumerate(rounds):
        writer = (_HeldAtCommit if held else ShardWriter)(
            uri, object_size=MiB, num_threads=2, **options
        )
        writer.barrier = barrier
        barrier.wait(timeout=60)
        try:
            dcp.save(race_state(job, i), storage_writer=writer)
            emit(event="round", job=job, round=i, outcome="won", detail=writer.attempt)
        except CheckpointException as exc:
            cause = exc.failures[0][0]
            emit(event="round", job=job, round=i, outcome=type(cause).__name__, detail=str(cause))
            if held and type(cause).__name__ != "CheckpointExistsError":
                barrier.abort()


def _fork_race(cmd: dict[str, Any]) -> None:
    barrier = multiprocessing.get_context("fork").Barrier(2)
    pids = []
    for job in (1, 2):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _race(job, cmd["rounds"], barrier)
            except BaseException:
                emit(event="error", job=job, rank=0, error=traceback.format_exc())
                code = 1
            os._exit(code)
        pids.append(pid)
    codes = [os.waitpid(pid, 0)[1] for pid in pids]
    emit(event="exited", job="race", status=[os.waitstatus_to_exitcode(c) for c in codes])


def main() -> None:
    emit(event="ready")
    ops = {"job": _fork_job, "verify": _fork_verify, "race": _fork_race}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] not in ops:
            return
        ops[cmd["op"]](cmd)


# -- the driver's side ---------------------------------------------------------------------
class Zygote:
    """The zygote process, and the JSON events it and its workers print."""

    def __init__(self, log: Path) -> None:
        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.workers"],
            cwd=Path(__file__).resolve().parents[2],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("ready", timeout=120)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def next_event(self, timeout: float) -> dict[str, Any]:
        """The next event (``queue.Empty`` after ``timeout`` seconds); a worker's error fails."""
        event = self.events.get(timeout=timeout)
        if event["event"] == "error":
            raise AssertionError(f"worker {event['job']}/{event['rank']} failed:\n{event['error']}")
        return event

    def expect(self, name: str, timeout: float = 60) -> dict[str, Any]:
        event = self.next_event(timeout)
        assert event["event"] == name, f"expected {name!r}, got {event}"
        return event

    def close(self) -> None:
        try:
            self.send(op="quit")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._log.close()


if __name__ == "__main__":
    main()
