"""Where a world-size-1 load's time goes: shardckpt's ``ShardReader`` against the raw GET.

One process loads the same state (``--size-mib`` of float32 in ``--tensors`` tensors, saved
once, untimed) through:

- ``shardckpt``: ``dcp.load`` with a new ``ShardReader`` (defaults), as a user calls it; its
  phases: ``open`` (the store's S3 client), ``manifest`` (GET and parse), ``data``
  (``read_data``: the GETs, each item's CRC32C checked by the thread whose GET completed it),
  ``dcp`` (the rest: DCP's planning and bookkeeping);
- ``raw``: boto3, 8 threads, GET of the same bytes as 64 MiB objects straight into the
  tensors (``systems.RawLimit``: its client is made once, untimed).

The two alternate within each repetition (who goes first rotates), every load is checked bit
for bit off the clock, and each rep records wall seconds and the process's CPU seconds (every
thread). The figure is ``shardckpt_of_raw``: raw's time over shardckpt's, per rep (each pair
seconds apart, so a machine shared with others skews it less than a ratio of medians), and its
median; 1.0 is the raw GET's speed. Server: as ``transport_bench`` (``--server seaweedfs`` by
default, or ``--endpoint``). Results: ``benchmarks/results/load_bench.json``.

    python -m benchmarks.load_bench --server seaweedfs            # 1 GiB in 64, 7 reps
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from benchmarks.s3util import MiB, Target, delete_prefix
from benchmarks.systems import Phases, RawLimit, Shardckpt, State, System
from benchmarks.transport_bench import (
    cpu_seconds,
    make_state,
    one_process_parser,
    parse_sizes,
    server,
)
from shardckpt import ShardReader
from shardckpt.store import ObjectStore

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "load_bench.json"


class TimedReader(ShardReader):
    """``ShardReader`` that adds the seconds of each of its calls to ``phases``."""

    def __init__(self, uri: str, phases: dict[str, float], **options: Any) -> None:
        super().__init__(uri, **options)
        self.phases = phases
        self._timed: ObjectStore | None = None  # the store whose opening was timed

    def _add(self, phase: str, started: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - started

    @property
    def store(self) -> ObjectStore:
        started = time.perf_counter()
        store = super().store
        if store is not self._timed:  # just opened
            self._timed = store
            self._add("open", started)
        return store

    def read_metadata(self, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return super().read_metadata(*args)
        finally:
            self._add("manifest", started)

    def read_data(self, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return super().read_data(*args)
        finally:
            self._add("data", started)


class PhasedShardckpt(Shardckpt):
    """``dcp.load`` with a new :class:`TimedReader`; returns its phases."""

    def load(self, state: State, uri: str) -> Phases:
        phases: dict[str, float] = {}
        started = time.perf_counter()
        dcp.load(state, storage_reader=TimedReader(uri, phases, **self.options))
        phases["manifest"] -= phases.get("open", 0.0)  # the store opens in read_metadata
        phases["dcp"] = time.perf_counter() - started - sum(phases.values())
        return phases


def run(
    systems: list[System], state: State, bucket: str, reps: int, client: Any
) -> dict[str, list[dict[str, Any]]]:
    """Save ``state`` once per system (untimed), then ``reps`` + 1 alternating loads (the
    first warms connections and caches up, not recorded); each rep's wall and CPU seconds and
    phases per system."""
    run_id = f"load-bench/{uuid.uuid4().hex[:8]}"
    uris = {s.name: f"s3://{bucket}/{run_id}/{s.name}" for s in systems}
    for system in systems:
        system.prepare_save(state, uris[system.name])
        system.save(state, uris[system.name])
    dest = {k: torch.empty_like(v) for k, v in state.items()}
    samples: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
    try:
        for rep in range(reps + 1):
            shift = rep % len(systems)
            for system in systems[shift:] + systems[:shift]:
                for tensor in dest.values():
                    tensor.zero_()  # also faults the pages in, for every system alike
                cpu, started = cpu_seconds(), time.perf_counter()
                phases = system.load(dest, uris[system.name]) or {}
                sample = {
                    "seconds": time.perf_counter() - started,
                    "cpu_seconds": cpu_seconds() - cpu,
                    "phases": phases,
                }
                bad = next((k for k in state if not torch.equal(state[k], dest[k])), None)
                if bad is not None:
                    raise SystemExit(f"{system.name} loaded {bad} wrong")
                label = "warm-up" if rep == 0 else f"rep {rep}"
                steps = " ".join(f"{k} {v:.3f}" for k, v in phases.items())
                print(
                    f"  {label:7} {system.name:10} load {sample['seconds']:6.3f}s "
                    f"(cpu {sample['cpu_seconds']:5.2f}s) {steps}",
                    flush=True,
                )
                if rep:
                    samples[system.name].append(sample)
    finally:
        for system in systems:
            system.cleanup(uris[system.name])
        delete_prefix(client, bucket, f"{run_id}/")
    return samples


def summary(samples: dict[str, list[dict[str, Any]]], base: str = "raw") -> dict[str, Any]:
    """Per system: median seconds, CPU seconds and phases, and its speed as a fraction of
    ``base``'s (the median of the per-rep ratios)."""
    out: dict[str, Any] = {}
    for name, reps in samples.items():
        phases = sorted({p for r in reps for p in r["phases"]})
        ratios = [b["seconds"] / r["seconds"] for b, r in zip(samples[base], reps, strict=True)]
        out[name] = {
            "seconds": statistics.median(r["seconds"] for r in reps),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in reps),
            "phases": {p: statistics.median(r["phases"].get(p, 0.0) for r in reps) for p in phases},
            f"speed_of_{base}_per_rep": [round(x, 3) for x in ratios],
            f"speed_of_{base}": statistics.median(ratios),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = one_process_parser(__doc__, bucket="load-bench", reps=7)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parse_sizes(parser, argv)
    print(
        f"load_bench: {args.size_mib} MiB in {args.tensors} tensors on "
        f"{args.endpoint or args.server}, {args.reps} reps after a warm-up",
        flush=True,
    )
    with server(args) as endpoint:
        target = Target(endpoint, args.bucket, 0, 1, tempfile.gettempdir())
        systems: list[System] = [PhasedShardckpt(target), RawLimit(target)]
        state = make_state(args.size_mib * MiB, args.tensors)
        samples = run(systems, state, args.bucket, args.reps, target.client())
    result = summary(samples)
    document = {
        "benchmark": "load_bench",
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "samples": samples,
        "summary": result,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print()
    for name, row in result.items():
        phases = " ".join(f"{k} {v:.3f}" for k, v in row["phases"].items())
        print(
            f"{name:10} load {row['seconds']:6.3f}s cpu {row['cpu_seconds']:5.2f}s "
            f"{row['speed_of_raw']:.3f}x raw  {phases}"
        )
    print(f"\nresults in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
