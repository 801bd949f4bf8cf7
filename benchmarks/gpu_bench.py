"""The GPU figures: what a save of GPU-resident state costs the training loop.

    python -m benchmarks.gpu_bench [--size-mib 1024] [--reps 3] [--out FILE]

One short script (a few minutes on one H100): every section alternates the systems it
compares, medians of ``--reps`` after one warm-up, and the JSON is rewritten after each
section, so a run cut short keeps what it measured.
1. The card's copy bandwidth: one large copy into pinned memory (the limit a snapshot is
   held to), into pageable memory, and host-to-device from pinned and from pageable memory.
2. Snapshot of ``--size-mib`` in 64 GPU tensors: ``HostStaging.snapshot`` and
   ``Checkpointer.save`` (local store) against ``copy_`` of the same tensors into
   preallocated pinned memory (target: 80% of its GB/s); overlap mode; the first save's
   allocation and pinning.
3. A transformer and its AdamW state on the GPU (the training model of section 6):
   ``Checkpointer.save`` against ``copy_`` of the same tensors.
4. Load of section 2's checkpoint into GPU tensors (issue 17: through reused pinned pieces,
   copied on a side stream): end to end, and its host-to-device part (the copies' own rate,
   timed with CUDA events), against the card's pinned and pageable host-to-device rates
   (target: the host-to-device part at 80% of pinned).
5. Against a moto server started here: blocking time and time to commit for
   ``Checkpointer.save``, ``dcp.async_save`` with ``ShardWriter`` + ``PinnedStager``, and
   ``dcp.async_save`` with s3torchconnector's ``S3StorageWriter`` (DCP's own stager).
6. The transformer's training step time while its own state uploads (to moto, to the local
   store, and from another process to the local store) against the step time without.

``--device cpu`` runs the same sections on the CPU, a check of the script itself.
Writes ``benchmarks/results/gpu_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.utils._pytree import tree_leaves

from benchmarks.async_bench import (
    ToyTraining,
    blocking_times,
    copy_to_host,
    host_copy_target,
    make_state,
    overlap_blocking,
    step_slowdown,
    step_slowdown_other_process,
)
from benchmarks.measure import blocked_and_done
from benchmarks.workloads import TransformerShape, transformer_model
from shardckpt import Checkpointer, ShardReader
from shardckpt.dcp.staging import HostStaging
from shardckpt.format.catalog import step_name
from shardckpt.testing.servers import start_moto

State = dict[str, torch.Tensor]
TARGET = 0.8  # snapshot GB/s over pinned copy_ GB/s


class TransformerTraining(ToyTraining):
    """A transformer encoder trained with AdamW on random tokens: a real model's mix of
    large and small tensors, and a step that launches hundreds of kernels from Python (where
    a background thread's share of the GIL would show)."""

    def __init__(self, device: str, shape: TransformerShape, batch: tuple[int, int]) -> None:
        torch.manual_seed(0)
        self.model = transformer_model(shape).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(*batch, shape.d_model, device=device)

    def state(self) -> dict[str, Any]:
        model, optim = get_state_dict(self.model, self.opt)
        return {"model": model, "optim": optim}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / 1e9 / statistics.median(seconds)


def nbytes_of(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(state) if torch.is_tensor(t))


def copy_bandwidth(size_mib: int, device: str, reps: int) -> dict[str, Any]:
    """GB/s of one ``size_mib`` copy: device to pinned host, device to pageable host, pinned
    host to device, pageable host to device."""
    nbytes = size_mib << 20
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pairs = {
        "d2h_pinned": (pinned, src),
        "d2h_pageable": (pageable, src),
        "h2d_pinned": (src, pinned),
        "h2d_pageable": (src, pageable),
    }
    times: dict[str, list[float]] = {k: [] for k in pairs}
    for _ in range(reps + 1):
        for name, (dst, source) in pairs.items():
            sync(device)
            start = time.perf_counter()
            dst.copy_(source, non_blocking=True)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {f"{k}_gbps": gbps(nbytes, v[1:]) for k, v in times.items()} | {"bytes": nbytes}


def snapshot(
    state: dict[str, Any], flat: State, root: str, reps: int, device: str
) -> dict[str, Any]:
    """``HostStaging.snapshot`` and ``Checkpointer.save`` of ``state`` against ``copy_`` of
    its tensors ``flat`` into preallocated pinned memory."""
    nbytes = nbytes_of(flat)
    dst = host_copy_target(flat)
    staging = HostStaging()
    times: dict[str, list[float]] = {
        "copy_": [],
        "HostStaging.snapshot": [],
        "Checkpointer.save": [],
    }
    with Checkpointer(root, keep_last=1) as ckpt:
        for rep in range(reps + 1):
            for name, call, finish in (
                ("copy_", lambda: copy_to_host(flat, dst), lambda _: None),
                ("HostStaging.snapshot", lambda: staging.snapshot(state), lambda _: None),
                ("Checkpointer.save", lambda rep=rep: ckpt.save(rep, state), lambda h: h.wait()),
            ):
                sync(device)  # nothing queued before: time the copy alone
                blocked, _ = blocked_and_done(call, finish)
                times[name].append(blocked)
        staged_bytes = ckpt.staging.nbytes
    staging.close()
    out: dict[str, Any] = {"bytes": nbytes, "tensors": len(flat), "staged_bytes": staged_bytes}
    out["first_s"] = {name: seconds[0] for name, seconds in times.items()}
    for name, seconds in times.items():
        out[f"{name}_s"] = seconds[1:]
        out[f"{name}_gbps"] = gbps(nbytes, seconds[1:])
    for name in ("HostStaging.snapshot", "Checkpointer.save"):
        out[f"{name}_vs_copy_"] = out[f"{name}_gbps"] / out["copy__gbps"]
    return out


def model_snapshot(train: TransformerTraining, root: str, reps: int, device: str) -> dict[str, Any]:
    """The training model's own state (model + AdamW), as :func:`snapshot`."""
    train.step()  # AdamW's state exists after the first step
    state = train.state()
    flat = {str(i): t for i, t in enumerate(tree_leaves(state)) if torch.is_tensor(t)}
    return snapshot(state, flat, root, reps, device)


def load(state: State, root: str, reps: int, device: str, limits: dict[str, Any]) -> dict[str, Any]:
    """``dcp.load`` of the newest checkpoint under ``root`` into tensors on ``device`` through
    ``ShardReader``, checked bit-exact: end to end, and the host-to-device part (the reader's
    ``device_stats``: the pinned copies' own rate), as GB/s and shares of ``limits``' pinned
    host-to-device rate."""
    out = {k: torch.empty_like(v) for k, v in state.items()}
    with Checkpointer(root) as ckpt:
        uri = ckpt.store.uri(step_name(ckpt.latest() or 0))
    times, h2d, pinned = [], [], 0
    for _ in range(reps + 1):
        for t in out.values():
            t.zero_()
        reader = ShardReader(uri)
        sync(device)
        start = time.perf_counter()
        dcp.load(out, storage_reader=reader)
        sync(device)
        times.append(time.perf_counter() - start)
        if reader.device_stats is not None:
            h2d.append(reader.device_stats.h2d_gbps)
            pinned = reader.device_stats.pinned_bytes
    wrong = [k for k, v in state.items() if not torch.equal(v, out[k])]
    if wrong:
        raise AssertionError(f"loaded tensors differ from the saved ones: {wrong[:5]}")
    nbytes = nbytes_of(state)
    result: dict[str, Any] = {
        "bytes": nbytes,
        "load_s": times[1:],
        "load_gbps": gbps(nbytes, times[1:]),
        "pinned_bytes": pinned,
        "h2d_gbps": statistics.median(h2d[1:]) if h2d[1:] else None,
    }
    limit = limits.get("h2d_pinned_gbps")
    if limit:
        result["load_vs_h2d_pinned"] = result["load_gbps"] / limit
        if result["h2d_gbps"]:
            result["h2d_vs_h2d_pinned"] = result["h2d_gbps"] / limit
    return result


def peers(state: State, reps: int) -> dict[str, Any]:
    """Blocking time and time to commit against moto, per system."""
    with start_moto() as server:
        os.environ.update(server.env)
        server.create_bucket("bench")
        blocking, committed = blocking_times(state, server, reps)
    return {
        "blocking_median_s": {k: statistics.median(v) for k, v in blocking.items()},
        "committed_median_s": {k: statistics.median(v) for k, v in committed.items()},
        "blocking_s": blocking,
        "committed_s": committed,
    }


def step_time(train: TransformerTraining, tmp: str, reps: int) -> dict[str, Any]:
    """The training step while its own state uploads, vs without."""
    state = train.state()
    size_mib = max(1, nbytes_of(state) >> 20)
    out: dict[str, Any] = {"state_bytes": nbytes_of(state)}
    with start_moto() as server:
        os.environ.update(server.env)
        server.create_bucket("bench")
        out["moto, background thread"] = step_slowdown(
            state, "s3://bench/steps", {"endpoint": server.endpoint}, server, reps, train
        )
    out["local store, background thread"] = step_slowdown(
        state, os.path.join(tmp, "steps"), {}, None, reps, train
    )
    out[f"local store, another process ({size_mib} MiB of CPU tensors)"] = (
        step_slowdown_other_process(size_mib, os.path.join(tmp, "proc"), reps, train)
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--model",
        default="1024,16,4096,8",
        help="the transformer: d_model,heads,d_ff,layers (default 1024,16,4096,8: ~100M "
        "parameters, 1.2 GB with AdamW's state)",
    )
    parser.add_argument("--batch", default="8,512", help="sequences,tokens per step")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_bench.json")
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; skipped (--device cpu checks the script)")
        return {"skipped": "no CUDA device"}
    warnings.filterwarnings("ignore")
    torch.backends.cuda.matmul.allow_tf32 = True
    device, reps = args.device, args.reps
    shape = TransformerShape(*map(int, args.model.split(",")))
    batch = tuple(map(int, args.batch.split(",")))
    result: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "state_mib": args.size_mib,
        "reps": reps,
        "model": vars(shape) | {"batch": batch},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def section(name: str, run: Callable[[], Any]) -> None:
        start = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        try:
            result[name] = run()
        except Exception:
            result[name] = {"error": traceback.format_exc()}
            print(result[name]["error"], flush=True)
        result.setdefault("section_s", {})[name] = time.perf_counter() - start
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)

    state = make_state(args.size_mib, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        section("bandwidth", lambda: copy_bandwidth(args.size_mib, device, reps))
        section("snapshot", lambda: snapshot(state, state, os.path.join(tmp, "snap"), reps, device))
        section(
            "load",
            lambda: load(
                state, os.path.join(tmp, "snap"), reps, device, result.get("bandwidth", {})
            ),
        )
        train = TransformerTraining(device, shape, batch)
        section(
            "overlap_blocking_s",
            lambda: overlap_blocking(state, os.path.join(tmp, "overlap"), reps, train),
        )
        section(
            "model_snapshot",
            lambda: model_snapshot(train, os.path.join(tmp, "model"), reps, device),
        )
        section("step_time", lambda: step_time(train, tmp, reps))
        section("peers", lambda: peers(state, reps))
    summary(result)
    return result


def summary(result: dict[str, Any]) -> None:
    """The short table: GB/s against the limits, blocking times, step slowdowns."""
    print(
        f"\n{result['machine']['device']}, torch {result['machine']['torch']}, "
        f"{result['state_mib']} MiB in 64 tensors, medians of {result['reps']}"
    )
    bw, snap = result.get("bandwidth", {}), result.get("snapshot", {})
    if "d2h_pinned_gbps" in bw:
        print(
            f"  limit: D2H pinned {bw['d2h_pinned_gbps']:.1f} GB/s, pageable "
            f"{bw['d2h_pageable_gbps']:.1f}; H2D pinned {bw['h2d_pinned_gbps']:.1f}, "
            f"pageable {bw['h2d_pageable_gbps']:.1f}"
        )
    if "copy__gbps" in snap:
        for name in ("copy_", "HostStaging.snapshot", "Checkpointer.save"):
            vs = f" = {snap[name + '_vs_copy_']:.0%} of copy_" if name != "copy_" else ""
            print(
                f"  {name:<22} {snap[name + '_gbps']:6.1f} GB/s{vs}  (first {snap['first_s'][name]:.2f} s)"
            )
        print(
            f"  staging holds {snap['staged_bytes'] / 2**20:.0f} MiB for {snap['bytes'] / 2**20:.0f} MiB of state (target {TARGET:.0%} of copy_)"
        )
    if isinstance(result.get("overlap_blocking_s"), list):
        print(
            f"  overlap mode: save blocks {statistics.median(result['overlap_blocking_s']) * 1e3:.1f} ms"
        )
    model = result.get("model_snapshot", {})
    if "copy__gbps" in model:
        print(
            f"  transformer+AdamW ({model['tensors']} tensors, {model['bytes'] / 1e9:.2f} GB): "
            f"Checkpointer.save {model['Checkpointer.save_gbps']:.1f} GB/s = "
            f"{model['Checkpointer.save_vs_copy_']:.0%} of copy_ ({model['copy__gbps']:.1f} GB/s)"
        )
    ld = result.get("load", {})
    if "load_gbps" in ld:
        share = (
            f" = {ld['load_vs_h2d_pinned']:.0%} of H2D pinned" if "load_vs_h2d_pinned" in ld else ""
        )
        print(
            f"  load into GPU tensors (local store): {ld['load_gbps']:.2f} GB/s end to end{share}"
        )
    if ld.get("h2d_gbps"):
        share = f" = {ld['h2d_vs_h2d_pinned']:.0%}" if "h2d_vs_h2d_pinned" in ld else ""
        print(
            f"    its host-to-device part: {ld['h2d_gbps']:.1f} GB/s{share} of H2D pinned "
            f"(target {TARGET:.0%}), through {ld['pinned_bytes'] / 2**20:.0f} MiB of pinned pieces"
        )
    p = result.get("peers", {})
    for name, value in p.get("blocking_median_s", {}).items():
        done = p["committed_median_s"].get(name)
        tail = f", committed after {done:.2f} s" if done is not None else ""
        print(f"  moto: {name:<45} blocks {value * 1e3:8.1f} ms{tail}")
    for name, r in result.get("step_time", {}).items():
        if isinstance(r, dict) and r.get("slowdown"):
            print(
                f"  step {r['step_s_quiet'] * 1e3:.1f} -> {r['step_s_during_upload'] * 1e3:.1f} ms "
                f"({r['slowdown']:.3f}x, {r['steps_during_upload']} steps) during upload: {name}"
            )
    for name, value in result.items():
        if isinstance(value, dict) and "error" in value:
            print(f"  {name}: FAILED ({value['error'].strip().splitlines()[-1]})")


if __name__ == "__main__":
    main()
