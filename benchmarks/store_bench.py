"""Micro-benchmark of the store layer: parallel PUT and GET throughput of many objects.

Starts its own moto and rclone servers on loopback and, on each, times the same objects
(``--count`` objects of ``--size-mib`` MiB, the same bytes for every system) through:

- ``shardckpt-boto3``: ``open_store(..., transport="boto3")``, ``put`` / ``get_into``;
- ``shardckpt-crt``: the same with ``transport="crt"`` (no PUT on rclone: the CRT cannot
  upload to it);
- ``boto3-loop``: the peer baseline, a plain boto3 client doing ``put_object`` /
  ``get_object(...)["Body"].read()`` (checksums only where S3 requires them, as for our client).

Every system runs the objects through a ``ThreadPoolExecutor`` of ``--threads`` (8) workers.
Systems alternate within each repetition (A B C, then B C A, ...), the figure is the median of
``--reps`` repetitions, and every byte read back is checked after the clock stops. A system
whose single measurement exceeds ``--cap-s`` seconds is not repeated (flagged ``capped``).
Throughput is in MB/s (10^6 bytes per second). Results go to
``benchmarks/results/store_bench.json``; the table gives ratios against ``boto3-loop``.

    python benchmarks/store_bench.py            # 16 x 16 MiB, 3 reps
    python benchmarks/store_bench.py --quick    # 8 x 4 MiB: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import boto3
import botocore.config
import numpy as np

from shardckpt.store import ObjectStore, open_store
from shardckpt.testing.servers import LocalS3Server, start_moto, start_rclone

MiB = 1 << 20
BUCKET = "store-bench"
SOURCE = "bench/src"  # the objects every system GETs, written once per server
BASELINE = "boto3-loop"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "store_bench.json"


class System(Protocol):
    """One way of moving the objects; ``put_all`` / ``get_all`` run them all in parallel."""

    name: str

    def put_all(self, keys: list[str], payload: bytes) -> None: ...

    def get_all(self, keys: list[str], outs: list[memoryview]) -> list[Any]: ...

    def close(self) -> None: ...


class ShardckptSystem:
    """Our store: ``put(key, [payload])`` and ``get_into(key, 0, [out])``."""

    def __init__(self, server: LocalS3Server, transport: str, threads: int) -> None:
        self.name = f"shardckpt-{transport}"
        self.store: ObjectStore = open_store(
            f"s3://{BUCKET}", endpoint=server.endpoint, transport=transport
        )
        self.pool = ThreadPoolExecutor(threads)

    def put_all(self, keys: list[str], payload: bytes) -> None:
        list(self.pool.map(lambda key: self.store.put(key, [payload]), keys))

    def get_all(self, keys: list[str], outs: list[memoryview]) -> list[Any]:
        list(self.pool.map(lambda key, out: self.store.get_into(key, 0, [out]), keys, outs))
        return outs

    def close(self) -> None:
        self.pool.shutdown()
        self.store.close()


class Boto3Loop:
    """The baseline a user would write: one boto3 client, a thread pool, whole objects."""

    name = BASELINE

    def __init__(self, server: LocalS3Server, threads: int) -> None:
        self.client = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            region_name="us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                max_pool_connections=max(10, 2 * threads),
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self.pool = ThreadPoolExecutor(threads)

    def put_all(self, keys: list[str], payload: bytes) -> None:
        list(
            self.pool.map(
                lambda key: self.client.put_object(Bucket=BUCKET, Key=key, Body=payload), keys
            )
        )

    def get_all(self, keys: list[str], outs: list[memoryview]) -> list[Any]:
        return list(
            self.pool.map(
                lambda key: self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read(), keys
            )
        )

    def close(self) -> None:
        self.pool.shutdown()
        self.client.close()


@dataclass
class Series:
    """The repetitions of one (server, system, operation): seconds each, and the throughput."""

    bytes_moved: int
    seconds: list[float] = field(default_factory=list)
    capped: bool = False

    @property
    def mbps(self) -> list[float]:
        return [self.bytes_moved / s / 1e6 for s in self.seconds]

    @property
    def median_mbps(self) -> float | None:
        return statistics.median(self.mbps) if self.seconds else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mbps": self.mbps, "median_mbps": self.median_mbps}


def timed(call: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def check(results: list[Any], payload: bytes, what: str) -> None:
    """Every object read back must be the payload, byte for byte (checked off the clock)."""
    for i, got in enumerate(results):
        if memoryview(got) != memoryview(payload):
            raise SystemExit(f"{what}: object {i} read back wrong")


def bench_server(
    server: LocalS3Server, args: argparse.Namespace, payload: bytes
) -> dict[str, dict[str, Series]]:
    server.create_bucket(BUCKET)
    keys = [f"{SOURCE}/{i:04d}" for i in range(args.count)]
    outs = [memoryview(np.empty(len(payload), dtype=np.uint8)) for _ in keys]
    systems: list[System] = [
        Boto3Loop(server, args.threads),
        ShardckptSystem(server, "boto3", args.threads),
    ]
    if "crt" in args.transports:
        systems.append(ShardckptSystem(server, "crt", args.threads))
    if "boto3" not in args.transports:
        systems = [s for s in systems if s.name != "shardckpt-boto3"]
    total = len(payload) * args.count
    series: dict[str, dict[str, Series]] = {s.name: {} for s in systems}
    try:
        systems[0].put_all(keys, payload)  # the objects every GET reads
        for system in systems:  # warm-up: connections, CRT client, server caches
            system.get_all(keys[:1], outs[:1])
            if can_put(server, system):
                system.put_all([f"bench/{system.name}/warmup"], payload)
        for rep in range(args.reps):
            order = (
                systems[rep % len(systems) :] + systems[: rep % len(systems)]
            )  # who goes first rotates
            for op in ("put", "get"):
                for system in order:
                    if op == "put" and not can_put(server, system):
                        continue
                    s = series[system.name].setdefault(op, Series(total))
                    if s.capped:
                        continue
                    if op == "put":
                        put_keys = [f"bench/{system.name}/{i:04d}" for i in range(args.count)]
                        seconds, _ = timed(
                            lambda system=system, put_keys=put_keys: system.put_all(
                                put_keys, payload
                            )
                        )
                    else:
                        for out in outs:  # no system finds the previous one's bytes in place
                            out[:8] = b"\0" * 8
                        seconds, got = timed(lambda system=system: system.get_all(keys, outs))
                        check(got, payload, f"{server.kind} {system.name} GET")  # type: ignore[arg-type]
                    s.seconds.append(seconds)
                    s.capped = seconds > args.cap_s and rep + 1 < args.reps
                    print(
                        f"  {server.kind:6} rep {rep + 1} {op.upper():3} {system.name:16} "
                        f"{total / seconds / 1e6:8.1f} MB/s ({seconds:.2f}s)"
                        + (" [capped]" if s.capped else ""),
                        flush=True,
                    )
    finally:
        for system in systems:
            system.close()
    return series


def can_put(server: LocalS3Server, system: System) -> bool:
    return not (server.kind == "rclone" and system.name == "shardckpt-crt")


def report(results: dict[str, dict[str, dict[str, Series]]]) -> list[dict[str, Any]]:
    rows = []
    for server, systems in results.items():
        base = systems.get(BASELINE, {})
        for name, ops in systems.items():
            row: dict[str, Any] = {"server": server, "system": name}
            for op in ("put", "get"):
                s = ops.get(op)
                mbps = s.median_mbps if s else None
                base_mbps = base[op].median_mbps if op in base else None
                row[f"{op}_mbps"] = mbps
                row[f"{op}_vs_{BASELINE}"] = mbps / base_mbps if mbps and base_mbps else None
                row[f"{op}_reps"] = len(s.seconds) if s else 0
                row[f"{op}_capped"] = bool(s and s.capped)
            rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def cell(value: float | None, fmt: str, suffix: str = "") -> str:
        return format(value, fmt) + suffix if value is not None else "-"

    header = (
        f"{'server':7} {'system':16} {'PUT MB/s':>9} {'vs loop':>8} {'GET MB/s':>9} {'vs loop':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        flags = "".join(
            f"  ({op.upper()}: {r[f'{op}_reps']} rep, capped)"
            for op in ("put", "get")
            if r[f"{op}_capped"]
        )
        print(
            f"{r['server']:7} {r['system']:16} {cell(r['put_mbps'], '.1f'):>9} "
            f"{cell(r[f'put_vs_{BASELINE}'], '.2f', 'x'):>8} {cell(r['get_mbps'], '.1f'):>9} "
            f"{cell(r[f'get_vs_{BASELINE}'], '.2f', 'x'):>8}{flags}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size-mib", type=int, default=16, help="size of each object in MiB (default 16)"
    )
    parser.add_argument("--count", type=int, default=16, help="number of objects (default 16)")
    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions; the median is reported (default 3)"
    )
    parser.add_argument(
        "--threads", type=int, default=8, help="parallel requests per system (default 8)"
    )
    parser.add_argument("--quick", action="store_true", help="8 objects of 4 MiB: a smoke test")
    parser.add_argument("--servers", default="moto,rclone", help="comma-separated: moto, rclone")
    parser.add_argument(
        "--transports", default="boto3,crt", help="our transports to measure (default boto3,crt)"
    )
    parser.add_argument(
        "--cap-s",
        type=float,
        default=20.0,
        help="a measurement slower than this is not repeated (default 20)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"JSON results (default {DEFAULT_OUTPUT})",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.count = 4, 8
    if args.reps < 1 or args.count < 1 or args.size_mib < 1:
        parser.error("--reps, --count and --size-mib must be positive")
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    starters = {"moto": start_moto, "rclone": start_rclone}
    unknown = set(servers) - set(starters)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}: use moto, rclone")

    payload = np.random.default_rng(0).bytes(args.size_mib * MiB)
    print(
        f"store_bench: {args.count} objects x {args.size_mib} MiB, {args.threads} threads, "
        f"median of {args.reps} reps, on {', '.join(servers)}",
        flush=True,
    )
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, Series]]] = {}
    for kind in servers:
        with starters[kind]() as server:
            os.environ.update(server.env)
            results[kind] = bench_server(server, args, payload)

    rows = report(results)
    document = {
        "benchmark": "store_bench",
        "config": {
            "size_mib": args.size_mib,
            "count": args.count,
            "reps": args.reps,
            "threads": args.threads,
            "cap_s": args.cap_s,
            "servers": servers,
            "transports": args.transports,
            "units": "MB/s = 1e6 bytes per second; seconds = wall time of all objects",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "boto3": boto3.__version__,
            "numpy": np.__version__,
        },
        "elapsed_s": time.monotonic() - started,
        "results": {
            srv: {name: {op: s.to_dict() for op, s in ops.items()} for name, ops in sy.items()}
            for srv, sy in results.items()
        },
        "summary": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(args.output)
    print()
    print_table(rows)
    print(f"\n{time.monotonic() - started:.0f}s in all; results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
