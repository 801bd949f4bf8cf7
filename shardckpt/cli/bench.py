"""``shardckpt bench URI``: how fast checkpoints save and load against a bucket, next to raw
PUT/GET of the same bytes (:mod:`shardckpt.tools.bench`; it deletes exactly what it wrote)."""

from __future__ import annotations

import argparse
from typing import Any

from shardckpt.cli.options import store_options
from shardckpt.cli.output import human_size
from shardckpt.tools.bench import BenchResult, run_bench

# Each phase, and the raw one it is compared with.
_RAW_OF = {"save": "raw PUT", "load": "raw GET", "raw PUT": "raw PUT", "raw GET": "raw GET"}


def cmd_bench(args: argparse.Namespace) -> int:
    result = run_bench(
        args.uri,
        size_mib=args.size_mib,
        tensors=args.tensors,
        reps=args.reps,
        **store_options(args),
    )
    print_table(result)
    return 0


def print_table(result: BenchResult) -> None:
    print(
        f"{result.uri}: {human_size(result.nbytes)} in {result.tensors} tensors, "
        f"median of {result.reps} rep{'' if result.reps == 1 else 's'}"
    )
    print(f"{'':<8}  {'SECONDS':>8}  {'GB/S':>7}  {'% OF RAW':>8}")
    for phase, raw in _RAW_OF.items():
        share = result.seconds[raw] / result.seconds[phase]
        print(
            f"{phase:<8}  {result.seconds[phase]:>8.3f}  {result.gb_per_s(phase):>7.3f}  {share:>8.0%}"
        )
    print(f"deleted the {result.deleted} objects it wrote")


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``bench`` to the ``shardckpt`` sub-command parser."""
    p = sub.add_parser(
        "bench",
        parents=[common],
        help="time a checkpoint save and load against a URI, next to raw PUT/GET",
    )
    p.add_argument(
        "uri", help="where to write (under a fresh prefix shardckpt-bench-<id>, deleted after)"
    )
    p.add_argument(
        "--size-mib", type=float, default=256, help="bytes of state, in MiB (default 256)"
    )
    p.add_argument(
        "--tensors", type=int, default=16, help="tensors they are split into (default 16)"
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions; medians are shown (default 3)")
    p.set_defaults(func=cmd_bench)
