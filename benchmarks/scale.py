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
import gc
import json
import math
import os
import pickle
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

from shardckpt.dcp.commit import RankReport, build_manifest, commit
from shardckpt.dcp.planner import UNCHANGED, ShardSavePlanner
from shardckpt.dcp.writer import WriterOptions
from shardckpt.format.layout import Layout, new_attempt_id
from shardckpt.format.manifest import Manifest, read_manifest
from shardckpt.format.records import ObjectRecord, RankItems, StreamRecord
from shardckpt.store import LocalStore

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


def report(rank: int, plan: SavePlan, object_size: int) -> RankReport:
    """What rank ``rank`` sends the coordinator after uploading ``plan``: its stream's
    objects and its items as columns (checksums are placeholders)."""
    fqns, chunks, offsets, lengths = [], [], [], []
    total = 0
    for item in plan.items:
        assert item.tensor_data is not None
        chunk = item.tensor_data.chunk
        fqns.append(item.index.fqn)
        chunks.append([*chunk.offsets, *chunk.sizes])
        offsets.append(total)
        lengths.append(chunk.sizes.numel() * 4)
        total += lengths[-1]
    layout, attempt = Layout(fanout=0), new_attempt_id()
    objects = tuple(
        ObjectRecord(
            layout.data_name(attempt, rank, i), min(object_size, total - i * object_size), 0
        )
        for i in range(-(-total // object_size))
    )
    items = RankItems(rank, -1, fqns, chunks, offsets, lengths, [0] * len(fqns))
    return RankReport(StreamRecord(rank, object_size, objects), items)


def place_objects(root: str, reports: list[RankReport]) -> None:
    """Sparse files standing for the ranks' uploaded objects: the commit checks that every
    object it names exists with its size."""
    for report in reports:
        for obj in report.stream.objects:
            path = os.path.join(root, obj.key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(obj.size)


def phase(name: str, out: dict[str, Any], fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = fn()
    out[f"{name}_s"] = time.perf_counter() - start
    return value


def unpickle_all(blobs: list[bytes]) -> list[Any]:
    return [pickle.loads(b) for b in blobs]


def simulate(
    world: int, tensors: int, tmp: str, *, dcp_planner: bool, pause_gc: bool
) -> dict[str, Any]:
    """One save at ``world`` ranks, every coordinator step timed (the ranks' own steps,
    which run in parallel on a real cluster, are timed for one rank). With ``pause_gc`` the
    cyclic collector is off from the plans' gather to their scatter, as the Checkpointer's
    planner does it."""
    out: dict[str, Any] = {"world": world, "tensors_per_rank": tensors, "items": world * tensors}
    object_size = WriterOptions().object_size
    plans = [local_plan(r, world, tensors) for r in range(world)]
    blobs = [pickle.dumps(p) for p in plans]
    out["plan_pickle_mib"] = sum(map(len, blobs)) / MiB
    if pause_gc:
        gc.disable()
    plans = phase("gather_plans", out, lambda: unpickle_all(blobs))
    planner = ShardSavePlanner()
    planner.set_up_planner({}, is_coordinator=True)
    global_plans, metadata = phase("global_plan", out, lambda: planner.create_global_plan(plans))
    if dcp_planner:  # DCP's own planner, for comparison
        dcp = DefaultSavePlanner()
        dcp.set_up_planner({}, is_coordinator=True)
        phase("dcp_global_plan", out, lambda: dcp.create_global_plan(plans))
    phase("scatter_plans", out, lambda: [pickle.dumps(p) for p in global_plans])
    gc.enable()
    finals = [  # what each rank's finish_plan makes of the plan it got
        local if final.planner_data == UNCHANGED else final
        for final, local in zip(global_plans, plans, strict=True)
    ]
    reports = [report(r, p, object_size) for r, p in enumerate(finals)]
    phase("rank_report", out, lambda: pickle.dumps(reports[0]))  # each rank, in parallel
    blobs = [pickle.dumps(r) for r in reports]
    results = phase("gather_reports", out, lambda: unpickle_all(blobs))
    results = [[WriteResult(MetadataIndex("report"), 0, r)] for r in results]

    root = os.path.join(tmp, f"w{world}")
    place_objects(root, reports)

    def build_and_commit() -> Manifest:
        manifest = build_manifest(metadata, results, {})
        commit(
            LocalStore(root, fsync=False),
            Layout(),
            manifest,
            overwrite=True,
        )
        return manifest

    manifest = phase("commit", out, build_and_commit)
    store = LocalStore(root)
    out["manifest_mib"] = store.head(Layout().manifest_key).size / MiB  # type: ignore[union-attr]
    out["parsed_items"] = len(phase("parse", out, lambda: read_manifest(store, Layout()).locations))
    out["plan_and_commit_s"] = out["global_plan_s"] + out["commit_s"]
    out["coordinator_s"] = sum(
        out[f"{k}_s"]
        for k in ("gather_plans", "global_plan", "scatter_plans", "gather_reports", "commit")
    )
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
        ("dcp_global_plan_s", "global plan, DCP's DefaultSavePlanner"),
        ("global_plan_s", "global plan, ShardSavePlanner"),
        ("commit_s", "manifest build + commit"),
        ("coordinator_s", "coordinator total (incl. gather/scatter pickles)"),
        ("parse_s", "manifest parse (per loader)"),
    ):
        points = [(r["world"], r[key]) for r in rows if key in r]
        left.plot(*zip(*points, strict=True), marker="o", label=label)
    first = rows[0]  # a line through the first point: what linear growth would be
    left.plot(
        worlds,
        [first["coordinator_s"] * w / first["world"] for w in worlds],
        linestyle=":",
        color="gray",
        label="linear in ranks",
    )
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
    parser.add_argument(
        "--dcp-up-to", type=int, default=256, help="also time DCP's planner up to this world size"
    )
    parser.add_argument(
        "--gc-on", action="store_true", help="leave the collector on while planning"
    )
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
            row = simulate(
                world,
                args.tensors,
                tmp,
                dcp_planner=world <= args.dcp_up_to,
                pause_gc=not args.gc_on,
            )
            gib_per_rank = 1 << 30
            row["rates"] = {
                f"fanout={f}": request_rates(world, gib_per_rank, f) for f in (0, 16, 64)
            }
            rows.append(row)
            print(
                f"W={world:5d} items={row['items']:8d}  plan {row['global_plan_s']:6.2f}s"
                f" (DCP's {row.get('dcp_global_plan_s', float('nan')):6.2f}s)  commit {row['commit_s']:6.2f}s"
                f"  coordinator {row['coordinator_s']:6.2f}s  parse {row['parse_s']:6.2f}s  manifest {row['manifest_mib']:7.1f} MiB  peak RSS {row['peak_rss_mib']:7.0f} MiB"
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
