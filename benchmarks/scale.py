"""Planning and commit cost at large world sizes, simulated in one process.

    python benchmarks/scale.py [--worlds 8 64 256 1024] [--tensors 1000] [--quick]

For each world size W, every rank holds a shard of each of T tensors (as FSDP does). The
script builds the W local plans DCP would gather, runs DCP's global planning, builds the
write results every rank would report, then the manifest (JSON) and its commit to a local
store, and parses it back as every loader does. It records seconds and peak memory of each
phase, the process's peak memory, the manifest's size, and the per-prefix request rates of a save at that scale under
the hashed-prefix layout. Writes ``benchmarks/results/scale.json`` and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt.layout import Layout
from shardckpt.manifest import ItemLocation, Manifest, ObjectRecord, StreamRecord
from shardckpt.reader import read_manifest
from shardckpt.store import LocalStore
from shardckpt.writer import WriterOptions, build_manifest, commit

MiB = 1 << 20
S3_PUT_PER_PREFIX = 3500  # requests per second S3 serves per prefix before SlowDown
S3_GET_PER_PREFIX = 5500


def local_plan(rank: int, world: int, tensors: int, rows: int = 4096, cols: int = 1024) -> SavePlan:
    """Rank ``rank``'s plan: one row-shard of each of ``tensors`` [rows, cols] float32 tensors."""
    props = TensorProperties(dtype=torch.float32)
    per = max(rows // world, 1)
    shape = torch.Size([per * world, cols])
    size = torch.Size([per, cols])
    items = []
    for t in range(tensors):
        offset = torch.Size([rank * per, 0])
        items.append(
            WriteItem(
                index=MetadataIndex(f"layers.{t}.weight", offset),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(ChunkStorageMetadata(offset, size), props, shape),
            )
        )
    return SavePlan(
        items, planner_data={f"layers.{t}.weight": (f"layers.{t}.weight",) for t in range(tensors)}
    )


def write_results(rank: int, plan: SavePlan, object_size: int) -> list[WriteResult]:
    """What rank ``rank`` reports after uploading ``plan``: item locations in its stream, and
    the stream's objects."""
    results, offset = [], 0
    for item in plan.items:
        assert item.tensor_data is not None
        length = item.tensor_data.chunk.sizes.numel() * 4
        results.append(WriteResult(item.index, length, ItemLocation(rank, offset, length, 0)))
        offset += length
    layout = Layout(fanout=0)
    objects = tuple(
        ObjectRecord(
            layout.data_name("attempt-sim", rank, i), min(object_size, offset - i * object_size), 0
        )
        for i in range(-(-offset // object_size))
    )
    results.append(
        WriteResult(
            MetadataIndex(f"\x00stream.{rank}"), offset, StreamRecord(rank, object_size, objects)
        )
    )
    return results


def phase(name: str, out: dict[str, Any], fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = fn()
    out[f"{name}_s"] = time.perf_counter() - start
    return value


def simulate(world: int, tensors: int, tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {"world": world, "tensors_per_rank": tensors, "items": world * tensors}
    object_size = WriterOptions().object_size
    plans = [local_plan(r, world, tensors) for r in range(world)]
    planner = DefaultSavePlanner()
    planner.set_up_planner({}, is_coordinator=True)
    global_plans, metadata = phase("global_plan", out, lambda: planner.create_global_plan(plans))
    results = [write_results(r, p, object_size) for r, p in enumerate(global_plans)]

    def build_and_commit() -> Manifest:
        manifest = build_manifest(metadata, results, {})
        commit(
            LocalStore(os.path.join(tmp, f"w{world}"), fsync=False),
            Layout(),
            manifest,
            overwrite=True,
        )
        return manifest

    manifest = phase("commit", out, build_and_commit)
    store = LocalStore(os.path.join(tmp, f"w{world}"))
    out["manifest_mib"] = store.head(Layout().manifest_key).size / MiB  # type: ignore[union-attr]
    phase("parse", out, lambda: read_manifest(store, Layout()))
    out["plan_and_commit_s"] = out["global_plan_s"] + out["commit_s"]
    out["peak_rss_mib"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # grows with W: runs go up
    out["objects"] = len(manifest.objects)
    return out


def request_rates(
    world: int,
    bytes_per_rank: int,
    fanout: int,
    *,
    threads: int = 8,
    object_size: int = 64 * MiB,
    stream_mbps: float = 90.0,
) -> dict[str, float]:
    """Per-prefix PUT/GET rates of a save/load at this scale: every rank keeps ``threads``
    requests in flight, each moving one object at ``stream_mbps`` MB/s (a typical single
    S3 stream); keys spread evenly over ``fanout`` hashed prefixes (1 without fanout)."""
    objects_per_rank = math.ceil(bytes_per_rank / object_size)
    seconds_per_request = object_size / (stream_mbps * 1e6)
    in_flight = world * min(threads, objects_per_rank)
    rate = in_flight / seconds_per_request
    prefixes = max(fanout, 1)
    return {
        "requests_per_s": rate,
        "per_prefix_per_s": rate / prefixes,
        "put_limit_share": rate / prefixes / S3_PUT_PER_PREFIX,
        "get_limit_share": rate / prefixes / S3_GET_PER_PREFIX,
    }


def plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    worlds = [r["world"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (
        ("global_plan_s", "DCP global plan"),
        ("commit_s", "manifest build + commit"),
        ("parse_s", "manifest parse (per loader)"),
    ):
        left.plot(worlds, [r[key] for r in rows], marker="o", label=label)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="ranks",
        ylabel="seconds",
        title=f"{rows[0]['tensors_per_rank']} tensors per rank",
    )
    left.legend()
    right.plot(worlds, [r["manifest_mib"] for r in rows], marker="o")
    right.set(xscale="log", yscale="log", xlabel="ranks", ylabel="MiB", title="manifest size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="worlds 8 and 64, 100 tensors")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "scale.json")
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.worlds, args.tensors = [8, 64], 100
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            row = simulate(world, args.tensors, tmp)
            gib_per_rank = 1 << 30
            row["rates"] = {
                f"fanout={f}": request_rates(world, gib_per_rank, f) for f in (0, 16, 64)
            }
            rows.append(row)
            print(
                f"W={world:5d} items={row['items']:8d}  plan {row['global_plan_s']:6.2f}s  commit {row['commit_s']:6.2f}s"
                f"  parse {row['parse_s']:6.2f}s  manifest {row['manifest_mib']:7.1f} MiB  peak RSS {row['peak_rss_mib']:7.0f} MiB"
                f"  PUT/s per prefix (1 GiB/rank): {row['rates']['fanout=0']['per_prefix_per_s']:8.0f} -> "
                f"{row['rates']['fanout=64']['per_prefix_per_s']:6.0f} with fanout=64",
                flush=True,
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    plot(rows, args.out.removesuffix(".json") + ".png")
    return rows


if __name__ == "__main__":
    main()
