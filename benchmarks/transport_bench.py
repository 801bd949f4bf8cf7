"""Our two S3 transports against s3torchconnector on the same CRT client, through DCP.

One process (world size 1) saves and loads the same state (``--size-mib`` of float32 in
``--tensors`` tensors) through:

- ``shardckpt-boto3``: ``ShardWriter`` / ``ShardReader`` with ``transport="boto3"``;
- ``shardckpt-crt``: the same with ``transport="crt"``;
- ``s3tc-t8``: s3torchconnector's ``S3StorageWriter(thread_count=8)`` /
  ``S3StorageReader`` (default ``dcp_optimized`` reader), its own CRT client and defaults;
- ``raw``: boto3, 8 threads, the same bytes as 64 MiB objects (bodies prebuilt).

Systems alternate within each repetition (who goes first rotates), every load is checked
bit for bit off the clock, and the figure is the median of ``--reps``, of wall time and of the
process's CPU time (all threads: on a machine the server shares, what the client burns is
taken from the server). The server is SeaweedFS
(``--server seaweedfs``, started here on 127.0.0.1 only), rclone or moto (as the test suite
starts them), or any running server (``--endpoint URL --bucket NAME``, credentials from the
environment). Results go to ``benchmarks/results/transport_bench.json``; the table gives
speeds relative to ``s3tc-t8`` (the peer the CRT transport must match; > 1 is faster), each
the median of the per-rep ratios.

    python -m benchmarks.transport_bench --server seaweedfs             # 1 GiB in 64, 3 reps
    python -m benchmarks.transport_bench --server seaweedfs --size-mib 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.s3util import MiB, Target, delete_prefix
from benchmarks.systems import Connector, Phases, RawLimit, Shardckpt, State, System
from shardckpt.testing.servers import start

PEER = "s3tc-t8"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "transport_bench.json"


class ShardckptOver(Shardckpt):
    """``ShardWriter`` / ``ShardReader`` (defaults) over one transport."""

    def __init__(self, target: Target, transport: str) -> None:
        super().__init__(target)
        self.transport = transport
        self.name = f"shardckpt-{transport}"
        self.description = f"ShardWriter/ShardReader, transport={transport!r}, other defaults"

    def save(self, state: State, uri: str) -> Phases:
        from torch.distributed import checkpoint as dcp

        from shardckpt import ShardWriter

        endpoint = self.target.endpoint
        dcp.save(
            state, storage_writer=ShardWriter(uri, endpoint=endpoint, transport=self.transport)
        )
        return None

    def load(self, state: State, uri: str) -> Phases:
        from torch.distributed import checkpoint as dcp

        from shardckpt import ShardReader

        endpoint = self.target.endpoint
        dcp.load(
            state, storage_reader=ShardReader(uri, endpoint=endpoint, transport=self.transport)
        )
        return None


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    """The endpoint to measure, with ``args.bucket`` in it and credentials in the environment:
    ``args.endpoint``, or a local ``args.server`` started as the test suite starts it."""
    if args.endpoint:
        yield args.endpoint
        return
    with start(args.server) as local:
        os.environ.update(local.env)
        local.create_bucket(args.bucket)
        yield local.endpoint


def make_state(size: int, count: int) -> State:
    generator = torch.Generator().manual_seed(0)
    numel = size // count // 4
    return {f"t{i:03d}": torch.rand(numel, generator=generator) for i in range(count)}


def build(names: list[str], target: Target) -> list[System]:
    made = {
        "shardckpt-boto3": lambda: ShardckptOver(target, "boto3"),
        "shardckpt-crt": lambda: ShardckptOver(target, "crt"),
        PEER: lambda: Connector(target, 8),
        "raw": lambda: RawLimit(target),
    }
    unknown = [n for n in names if n not in made]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {list(made)}")
    return [made[n]() for n in names]


def cpu_seconds() -> float:
    """CPU time of this process (every thread, the CRT's included), user plus system."""
    times = os.times()
    return times.user + times.system


def run(args: argparse.Namespace, endpoint: str) -> dict[str, dict[str, list[float]]]:
    target = Target(endpoint, args.bucket, 0, 1, tempfile.gettempdir())
    systems = build(args.systems, target)
    state = make_state(args.size_mib * MiB, args.tensors)
    dest = {k: torch.empty_like(v) for k, v in state.items()}
    client = target.client()
    run_id = f"transport-bench/{uuid.uuid4().hex[:8]}"
    ops = ("save", "load", "save_cpu", "load_cpu")
    seconds: dict[str, dict[str, list[float]]] = {s.name: {op: [] for op in ops} for s in systems}
    for rep in range(args.reps + 1):  # rep 0 warms up connections, clients and server caches
        shift = rep % len(systems)
        for system in systems[shift:] + systems[:shift]:
            uri = f"s3://{args.bucket}/{run_id}/{system.name}/{rep}"
            system.prepare_save(state, uri)
            cpu, started = cpu_seconds(), time.perf_counter()
            system.save(state, uri)
            saved = time.perf_counter()
            save_cpu = cpu_seconds() - cpu
            for tensor in dest.values():
                tensor.zero_()
            cpu, loaded_at = cpu_seconds(), time.perf_counter()
            system.load(dest, uri)
            loaded = time.perf_counter()
            load_cpu = cpu_seconds() - cpu
            bad = next((k for k in state if not torch.equal(state[k], dest[k])), None)
            if bad is not None:
                raise SystemExit(f"{system.name} loaded {bad} wrong")
            system.cleanup(uri)
            delete_prefix(client, args.bucket, f"{run_id}/{system.name}/{rep}/")
            label = "warm-up" if rep == 0 else f"rep {rep}"
            print(
                f"  {label:7} {system.name:16} save {saved - started:6.2f}s (cpu {save_cpu:5.2f}s)"
                f"  load {loaded - loaded_at:6.2f}s (cpu {load_cpu:5.2f}s)",
                flush=True,
            )
            if rep:
                for op, value in zip(
                    ops, (saved - started, loaded - loaded_at, save_cpu, load_cpu), strict=True
                ):
                    seconds[system.name][op].append(value)
    return seconds


def summary(seconds: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Medians per system; the speed against the peer is the median of the per-rep ratios
    (each against the peer's run of the same rep, minutes apart at most), which a server
    whose speed drifts during the run skews less than a ratio of medians."""
    peer = seconds.get(PEER)
    rows = []
    for name, ops in seconds.items():
        row: dict[str, Any] = {"system": name}
        row.update({f"{op}_s": statistics.median(values) for op, values in ops.items()})
        for op in ("save", "load"):  # > 1: faster than the peer
            ratios = [p / s for p, s in zip(peer[op], ops[op], strict=True)] if peer else []
            row[f"{op}_speed_vs_{PEER}"] = statistics.median(ratios) if ratios else None
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else "-"

    print(
        f"{'system':16} {'save s':>7} {'vs s3tc':>8} {'cpu s':>6} "
        f"{'load s':>7} {'vs s3tc':>8} {'cpu s':>6}"
    )
    for r in rows:
        print(
            f"{r['system']:16} {r['save_s']:7.2f} {ratio(r[f'save_speed_vs_{PEER}']):>8} "
            f"{r['save_cpu_s']:6.2f} {r['load_s']:7.2f} {ratio(r[f'load_speed_vs_{PEER}']):>8} "
            f"{r['load_cpu_s']:6.2f}"
        )


def one_process_parser(
    description: str | None, *, bucket: str, reps: int
) -> argparse.ArgumentParser:
    """The options every one-process benchmark here takes: the server, the state's size, reps."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", default="seaweedfs", choices=("seaweedfs", "rclone", "moto"))
    parser.add_argument("--endpoint", help="a running S3 server instead (credentials from env)")
    parser.add_argument("--bucket", default=bucket)
    parser.add_argument("--size-mib", type=int, default=1024, help="state size (default 1024)")
    parser.add_argument("--tensors", type=int, default=64, help="tensors (default 64)")
    parser.add_argument(
        "--reps", type=int, default=reps, help=f"timed repetitions (default {reps})"
    )
    return parser


def parse_sizes(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.reps < 1 or args.size_mib < 1 or args.tensors < 1:
        parser.error("--reps, --size-mib and --tensors must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = one_process_parser(__doc__, bucket="transport-bench", reps=3)
    parser.add_argument(
        "--systems",
        default=f"shardckpt-boto3,shardckpt-crt,{PEER},raw",
        help="comma-separated (default: all four)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parse_sizes(parser, argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    where = args.endpoint or args.server
    print(
        f"transport_bench: {args.size_mib} MiB in {args.tensors} tensors on {where}, "
        f"median of {args.reps} reps after a warm-up",
        flush=True,
    )
    with server(args) as endpoint:
        seconds = run(args, endpoint)
    rows = summary(seconds)
    document = {
        "benchmark": "transport_bench",
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "cpus": os.cpu_count(),
        "seconds": seconds,
        "summary": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print()
    print_table(rows)
    print(f"\nresults in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
