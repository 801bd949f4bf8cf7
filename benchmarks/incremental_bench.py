"""Incremental saves and shared loads, against plain saves and loads, in one run.

    python -m benchmarks.incremental_bench [--size-mib 512] [--saves 5] [--quick]

Three measurements, each side by side with its baseline (A B A B order, medians):

1. 90% frozen: a state of ``--size-mib`` MiB in 64 tensors of which 58 never change (a
   fine-tune with frozen layers) saved ``--saves`` times: bytes uploaded and the median save
   time (saves after the first), with ``incremental=True`` and without.
2. Fully changing: every tensor changes before every save: the incremental save's cost over
   the plain one (the CRC32C pass before the upload, XXH3 beside it, nothing to reuse).
3. Shared load: 2 ranks (gloo) load the same replicated checkpoint, with ``shared_load`` and
   without: load time and bytes fetched per rank.

Saves go to moto on 127.0.0.1 (which shares this machine's cores) and to a local store (where
the hashing is most visible). Writes ``benchmarks/results/incremental_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch

from benchmarks.spawn import run_ranks
from shardckpt import Checkpointer
from shardckpt.testing.servers import start_moto

MiB = 1 << 20
TENSORS = 64
FROZEN = 58  # of 64: 90.6% of the bytes


def make_state(size_mib: int, seed: int) -> dict[str, torch.Tensor]:
    n = size_mib * MiB // 4 // TENSORS
    g = torch.Generator().manual_seed(seed)
    return {f"t{i:02d}": torch.randn(n, generator=g) for i in range(TENSORS)}


def change(state: dict[str, torch.Tensor], names: list[str], step: int) -> None:
    for name in names:
        state[name].add_(step * 1e-3)


def save_series(
    root: str,
    options: dict[str, Any],
    state: dict[str, torch.Tensor],
    changing: list[str],
    saves: int,
    incremental: bool,
) -> dict[str, Any]:
    """``saves`` saves of ``state``, changing ``changing`` before each; seconds per save
    (save call to committed) and bytes uploaded."""
    times = []
    with Checkpointer(root, incremental=incremental, **options) as ck:
        for step in range(1, saves + 1):
            change(state, changing, step)
            started = time.perf_counter()
            ck.save(step, state).wait()
            times.append(time.perf_counter() - started)
        return {
            "save_s": times,
            "median_later_save_s": statistics.median(times[1:]),
            "bytes_put": ck.store.stats.bytes_put,
            "reused_bytes": [s.reused_bytes for s in ck.history],
        }


def compare_saves(
    where: str, options: dict[str, Any], size_mib: int, saves: int, frozen: int, rounds: int
) -> dict[str, Any]:
    """Plain and incremental series alternated ``rounds`` times; medians of their medians."""
    state = make_state(size_mib, 0)
    changing = sorted(state)[frozen:]
    out: dict[str, Any] = {"plain": [], "incremental": []}
    for r in range(rounds):
        for mode in ("plain", "incremental"):
            root = f"{where}/{mode}-{frozen}-{r}"
            out[mode].append(
                save_series(root, options, state, changing, saves, mode == "incremental")
            )
    summary = {
        mode: {
            "median_later_save_s": statistics.median(s["median_later_save_s"] for s in out[mode]),
            "bytes_put_mib": statistics.median(s["bytes_put"] for s in out[mode]) / MiB,
        }
        for mode in ("plain", "incremental")
    }
    summary["time_ratio"] = (
        summary["incremental"]["median_later_save_s"] / summary["plain"]["median_later_save_s"]
    )
    summary["bytes_ratio"] = (
        summary["incremental"]["bytes_put_mib"] / summary["plain"]["bytes_put_mib"]
    )
    return {"summary": summary, "runs": out}


def _load_rank(
    rank: int, world_size: int, root: str, options: dict[str, Any], shared: bool, size_mib: int
) -> dict[str, float]:
    state = make_state(size_mib, 1)
    with Checkpointer(root, shared_load=shared, **options) as ck:
        before = ck.store.stats.bytes_got
        started = time.perf_counter()
        ck.load(state)
        return {
            "load_s": time.perf_counter() - started,
            "bytes_got": ck.store.stats.bytes_got - before,
        }


def compare_loads(root: str, options: dict[str, Any], size_mib: int, rounds: int) -> dict[str, Any]:
    with Checkpointer(root, **options) as ck:
        ck.save(1, make_state(size_mib, 0)).wait()
    runs: dict[str, list[Any]] = {"every rank fetches": [], "shared fetch": []}
    for _ in range(rounds):
        for mode in runs:
            runs[mode].append(
                run_ranks(_load_rank, 2, root, options, mode == "shared fetch", size_mib)
            )
    summary = {
        mode: {
            "load_s": statistics.median(max(r["load_s"] for r in ranks) for ranks in rs),
            "bytes_got_mib_per_rank": [r["bytes_got"] / MiB for r in rs[-1]],
        }
        for mode, rs in runs.items()
    }
    summary["time_ratio"] = (
        summary["shared fetch"]["load_s"] / summary["every rank fetches"]["load_s"]
    )
    return {"summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64 MiB, 3 saves, 1 round")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "incremental_bench.json"),
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.saves, args.rounds = 64, 3, 1
    warnings.filterwarnings("ignore")
    server = start_moto()
    os.environ.update(server.env)
    server.create_bucket("bench")
    s3 = {"endpoint": server.endpoint}
    results: dict[str, Any] = {"size_mib": args.size_mib, "saves": args.saves}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for where, root, options in (("moto", "s3://bench", s3), ("local store", tmp, {})):
                for label, frozen in (("90% frozen", FROZEN), ("fully changing", 0)):
                    key = f"{label}, {where}"
                    results[key] = compare_saves(
                        root, options, args.size_mib, args.saves, frozen, args.rounds
                    )
                    s = results[key]["summary"]
                    print(
                        f"{key:28s} save {s['plain']['median_later_save_s']:6.2f}s -> {s['incremental']['median_later_save_s']:6.2f}s"
                        f" ({s['time_ratio']:.2f}x)  uploaded {s['plain']['bytes_put_mib']:7.0f} -> {s['incremental']['bytes_put_mib']:7.0f} MiB",
                        flush=True,
                    )
            results["2-rank replicated load, moto"] = compare_loads(
                "s3://bench/load", s3, args.size_mib, args.rounds
            )
            s = results["2-rank replicated load, moto"]["summary"]
            print(
                f"2-rank replicated load, moto: {s['every rank fetches']['load_s']:.2f}s -> {s['shared fetch']['load_s']:.2f}s"
                f" ({s['time_ratio']:.2f}x); MiB fetched per rank {s['every rank fetches']['bytes_got_mib_per_rank']} -> {s['shared fetch']['bytes_got_mib_per_rank']}",
                flush=True,
            )
    finally:
        server.stop()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
