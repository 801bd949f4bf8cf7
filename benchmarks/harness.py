"""The run: start the local S3 server (SeaweedFS by default; moto or rclone), make the bucket,
run every workload at every world size on spawned gloo ranks, and write the results (JSON,
table, plot), with the server and its version."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from benchmarks import report
from benchmarks.plot import plot
from benchmarks.spawn import run_ranks
from benchmarks.worker import Plan, rank_main
from benchmarks.workloads import Workload

logger = logging.getLogger(__name__)
BUCKET = "shardckpt-bench"
# A run writes to the current directory unless told otherwise: benchmarks/results holds the
# tracked figures the docs cite, which only an explicit --out-dir replaces.
OUT_DIR = "shardckpt-bench"


@dataclass(frozen=True)
class Config:
    """What to run. ``workloads`` by name (``1gib-64``), each at every world size;
    ``cap_seconds``: a system whose save+load exceeds it is not repeated; results go to
    ``out_dir/<name>.json`` and ``.png`` (default ``./shardckpt-bench``); ``server``: the
    local S3 server, one of ``shardckpt.testing.servers.STARTERS``."""

    name: str
    workloads: tuple[str, ...]
    world_sizes: tuple[int, ...]
    systems: tuple[str, ...]
    reps: int
    cap_seconds: float
    count_requests: bool
    connector_reader: str = "dcp_optimized"
    out_dir: str = OUT_DIR
    server: str = "seaweedfs"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def source() -> dict[str, Any]:
    """Which shardckpt was measured: the git commit, and a digest of the package's files
    (the working tree may differ from the commit)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, _, names in sorted(os.walk(os.path.join(root, "shardckpt"))):
        for name in sorted(n for n in names if n.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"git_commit": commit, "shardckpt_py_sha256": digest.hexdigest()}


def machine() -> dict[str, Any]:
    memory = None
    try:
        with open("/proc/meminfo") as f:
            memory = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": memory,
        "loadavg_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            d: _version(d)
            for d in (
                "torch",
                "s3torchconnector",
                "s3torchconnectorclient",
                "boto3",
                "botocore",
                "moto",
                "shardckpt",
            )
        },
    }


def reclaim_url(server: Any) -> str | None:
    """For SeaweedFS, the master's URL that compacts its volumes now: deleted objects keep
    their disk space until then (the master's own pass is every 15 minutes), and a run
    writes the state once per system and rep (a 16 GiB state, 4 systems, 2 reps: 128 GiB).
    The port is read off the command line ``shardckpt.testing.servers`` started it with."""
    if server.kind != "seaweedfs":
        return None
    flag = next(a for a in server.proc.args if str(a).startswith("-master.port="))
    return f"http://127.0.0.1:{flag.split('=')[1]}/vol/vacuum?garbageThreshold=0.001"


def run(config: Config) -> dict[str, Any]:
    """Run ``config``; write ``<out_dir>/<name>.json`` and ``.png``; return the results."""
    from shardckpt.testing.servers import start

    workloads = [Workload.parse(w, ws) for w in config.workloads for ws in config.world_sizes]
    results: dict[str, Any] = {
        "name": config.name,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "source": source(),
        "config": dict(config.__dict__),
        "conventions": report.__doc__,
        "workloads": [],
    }
    path = os.path.join(os.path.abspath(config.out_dir), f"{config.name}.json")
    scratch = tempfile.mkdtemp(prefix="shardckpt-bench-")
    server = start(config.server)
    results["server"] = {"kind": server.kind, "version": server.version}
    os.environ.update(server.env)
    started = time.monotonic()
    try:
        server.create_bucket(BUCKET)
        run_id = f"{config.name}-{uuid.uuid4().hex[:8]}"
        for index, workload in enumerate(workloads, 1):
            logger.info(
                "[%5.0fs] workload %d/%d: %s (%d bytes in %d tensors over %d ranks)",
                time.monotonic() - started,
                index,
                len(workloads),
                workload.label,
                workload.total_bytes,
                workload.num_tensors,
                workload.world_size,
            )
            plan = Plan(
                workload,
                config.systems,
                config.reps,
                server.endpoint,
                BUCKET,
                run_id,
                scratch,
                config.cap_seconds,
                config.count_requests,
                config.connector_reader,
                config.server,
                reclaim_url(server),
            )
            log = run_ranks(rank_main, workload.world_size, plan)[0]
            results["workloads"].append(report.summarise(workload, log))
            report.write_json(results, path)  # partial results survive a later crash
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - started
    results["loadavg_end"] = os.getloadavg()
    report.write_json(results, path)
    print(report.table(results))
    print(f"\nresults: {path}")
    why_not = plot(results, path[: -len(".json")] + ".png")
    print(why_not or f"plot: {path[: -len('.json')]}.png")
    return results
