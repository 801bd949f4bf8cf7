"""What a save costs the training loop: blocking time and step-time slowdown.

    python benchmarks/async_bench.py [--size-mib 1024] [--reps 3] [--quick]

Against a local moto server (started here) on the same bytes, alternating systems:
- ``copy_``: a plain copy of the state into preallocated memory (the floor for a snapshot);
- shardckpt ``Checkpointer.save`` (returns after the snapshot into reused host buffers);
- ``dcp.async_save`` with shardckpt's ``ShardWriter`` + ``PinnedStager``;
- ``dcp.async_save`` with s3torchconnector's ``S3StorageWriter`` (DCP's default stager).
Then the training step time while a background upload runs, vs without, with the S3
server's CPU time (it shares this machine's cores) and the same with the local store.
The same with the state on a GPU is ``benchmarks/gpu_bench.py``.
Writes ``benchmarks/results/async_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from benchmarks.measure import blocked_and_done
from shardckpt import Checkpointer, PinnedStager, ShardWriter
from shardckpt.testing.servers import LocalS3Server, start_moto

MiB = 1 << 20
REGION = "us-east-1"


def make_state(size_mib: int, tensors: int = 64, device: str = "cpu") -> dict[str, torch.Tensor]:
    per = size_mib * MiB // tensors // 4
    return {f"layer{i}.weight": torch.randn(per, device=device) for i in range(tensors)}


def host_copy_target(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Preallocated host memory for a copy of ``state`` (pinned for GPU tensors)."""
    return {
        k: torch.empty(v.shape, dtype=v.dtype, pin_memory=v.device.type == "cuda")
        for k, v in state.items()
    }


def copy_to_host(state: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> None:
    """The floor for a snapshot: ``copy_`` of every tensor into ``dst`` (non-blocking from
    a GPU, then one synchronize)."""
    for key, tensor in state.items():
        dst[key].copy_(tensor, non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def s3tc_writer(uri: str, endpoint: str) -> Any:
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp import S3StorageWriter
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    writer = S3StorageWriter(region=REGION, path=uri)
    client = S3Client(
        REGION, endpoint=endpoint, s3client_config=S3ClientConfig(force_path_style=True)
    )
    writer.fs = S3FileSystem(REGION, s3_client=client)
    return writer


SYSTEMS = (
    "copy_",
    "shardckpt Checkpointer.save",
    "dcp.async_save + ShardWriter + PinnedStager",
    "dcp.async_save + S3StorageWriter",
)


def blocking_times(
    state: dict[str, torch.Tensor], server: LocalS3Server, reps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds the caller is blocked, and seconds until the save is committed, per system,
    alternating systems each repetition."""
    dst = host_copy_target(state)
    ckpt = Checkpointer("s3://bench/ckpointer", endpoint=server.endpoint)
    stager = PinnedStager()
    times: dict[str, list[float]] = {k: [] for k in SYSTEMS}
    committed: dict[str, list[float]] = {k: [] for k in SYSTEMS[1:]}

    def timed(name: str, call: Callable[[], Any], finish: Callable[[Any], Any]) -> None:
        blocked, total = blocked_and_done(call, finish)
        times[name].append(blocked)
        if name in committed:
            committed[name].append(total)

    for rep in range(reps + 1):  # rep 0 warms up: first-save allocations are not steady state
        timed("copy_", lambda: copy_to_host(state, dst), lambda _: None)
        timed(
            "shardckpt Checkpointer.save", lambda rep=rep: ckpt.save(rep, state), lambda h: h.wait()
        )
        timed(
            "dcp.async_save + ShardWriter + PinnedStager",
            lambda rep=rep: dcp.async_save(
                state,
                storage_writer=ShardWriter(f"s3://bench/dcp-{rep}", endpoint=server.endpoint),
                async_stager=stager,
            ),
            lambda future: future.result(),
        )
        timed(
            "dcp.async_save + S3StorageWriter",
            lambda rep=rep: dcp.async_save(
                state, storage_writer=s3tc_writer(f"s3://bench/s3tc-{rep}", server.endpoint)
            ),
            lambda future: future.result(),
        )
    ckpt.close()
    stager.close()
    return {k: v[1:] for k, v in times.items()}, {k: v[1:] for k, v in committed.items()}


class ToyTraining:
    """A compute-bound training step (an MLP on random data), a few tens of ms on a CPU."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model: torch.nn.Module = torch.nn.Sequential(
            torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024)
        )
        self.opt: torch.optim.Optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.x = torch.randn(256, 1024)

    def step(self) -> float:
        """Seconds for one forward, backward and optimizer step (until the device is done)."""
        start = time.perf_counter()
        self.model(self.x).pow(2).mean().backward()
        self.opt.step()
        self.opt.zero_grad()
        if self.x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def step_slowdown(
    state: dict[str, torch.Tensor],
    root: str,
    options: dict[str, Any],
    server: LocalS3Server | None,
    reps: int,
    train: ToyTraining | None = None,
) -> dict[str, Any]:
    """Median step time with no save running vs while one uploads; the server's CPU seconds."""
    train = train or ToyTraining()
    for _ in range(5):
        train.step()
    quiet: list[float] = []
    busy: list[float] = []
    server_cpu = 0.0
    upload_s: list[float] = []
    with Checkpointer(root, **options) as ckpt:
        for rep in range(reps + 1):
            quiet += [train.step() for _ in range(10)]
            cpu0 = cpu_seconds(server.proc.pid) if server else 0.0
            start = time.perf_counter()
            handle = ckpt.save(rep, state)
            steps = []
            while not handle.done():
                steps.append(train.step())
            handle.wait()
            if rep:  # rep 0 allocates the staging buffers
                busy += steps
                upload_s.append(time.perf_counter() - start)
                server_cpu += (cpu_seconds(server.proc.pid) - cpu0) if server else 0.0
    return {
        "step_s_quiet": statistics.median(quiet),
        "step_s_during_upload": statistics.median(busy) if busy else None,
        "slowdown": statistics.median(busy) / statistics.median(quiet) if busy else None,
        "steps_during_upload": len(busy),
        "upload_s": statistics.median(upload_s),
        "server_cpu_s_per_save": server_cpu / reps,
    }


def _save_in_process(size_mib: int, root: str, ready: Any, go: Any) -> None:
    state = make_state(size_mib)
    ready.set()
    go.wait()
    dcp.save(state, storage_writer=ShardWriter(root), no_dist=True)


def step_slowdown_other_process(
    size_mib: int, root: str, reps: int, train: ToyTraining | None = None
) -> dict[str, Any]:
    """The same upload (to the local store) from another process, as a writer-process mode
    would run it: what remains of the slowdown is CPU and memory-bandwidth contention, not
    the GIL."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    train = train or ToyTraining()
    for _ in range(5):
        train.step()
    quiet = [train.step() for _ in range(10 * reps)]
    busy: list[float] = []
    for rep in range(reps):
        ready, go = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_save_in_process, args=(size_mib, f"{root}-{rep}", ready, go))
        proc.start()
        ready.wait()
        go.set()
        while proc.is_alive():
            busy.append(train.step())
        proc.join()
    return {
        "step_s_quiet": statistics.median(quiet),
        "step_s_during_upload": statistics.median(busy) if busy else None,
        "slowdown": statistics.median(busy) / statistics.median(quiet) if busy else None,
        "steps_during_upload": len(busy),
    }


def overlap_blocking(
    state: dict[str, torch.Tensor], root: str, reps: int, train: ToyTraining | None = None
) -> list[float]:
    """Seconds ``save`` blocks in overlap mode (the copy runs on while training computes)."""
    train = train or ToyTraining()
    times = []
    with Checkpointer(root, overlap=True) as ckpt:
        ckpt.attach(train.opt)
        for rep in range(reps + 1):
            start = time.perf_counter()
            handle = ckpt.save(rep, state)
            times.append(time.perf_counter() - start)
            train.step()  # its optimizer step waits for the copy
            handle.wait()
    return times[1:]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 MiB, 2 repetitions")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "async_bench.json")
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.reps = 64, 2
    warnings.filterwarnings("ignore")
    state = make_state(args.size_mib)
    server = start_moto()
    os.environ.update(server.env)
    server.create_bucket("bench")
    try:
        blocking, committed = blocking_times(state, server, args.reps)
        # Training with 1 intra-op thread leaves a core to the background work, as the spare
        # cores of a GPU node do; with all threads, training and upload share both cores.
        slowdown: dict[str, Any] = {}
        threads = torch.get_num_threads()
        for train_threads in sorted({1, threads}):
            torch.set_num_threads(train_threads)
            with tempfile.TemporaryDirectory() as tmp:
                slowdown[f"moto, {train_threads} training threads"] = step_slowdown(
                    state,
                    f"s3://bench/steps-{train_threads}",
                    {"endpoint": server.endpoint},
                    server,
                    args.reps,
                )
                slowdown[f"local store, {train_threads} training threads"] = step_slowdown(
                    state, os.path.join(tmp, "steps"), {}, None, args.reps
                )
            if train_threads == 1:
                with tempfile.TemporaryDirectory() as tmp:
                    slowdown[
                        f"local store from another process, {train_threads} training threads"
                    ] = step_slowdown_other_process(
                        args.size_mib, os.path.join(tmp, "proc"), args.reps
                    )
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            blocking["shardckpt Checkpointer.save, overlap=True"] = overlap_blocking(
                state, os.path.join(tmp, "overlap"), args.reps
            )
    finally:
        server.stop()
    medians = {k: statistics.median(v) for k, v in blocking.items()}
    ours = medians["shardckpt Checkpointer.save"]
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "state_mib": args.size_mib,
        "blocking_s": blocking,
        "blocking_median_s": medians,
        "committed_s": committed,
        "ratios": {
            "checkpointer_vs_copy_": ours / medians["copy_"],
            "checkpointer_vs_s3tc_async_save": ours / medians["dcp.async_save + S3StorageWriter"],
            "checkpointer_overlap_vs_s3tc_async_save": medians[
                "shardckpt Checkpointer.save, overlap=True"
            ]
            / medians["dcp.async_save + S3StorageWriter"],
            "pinnedstager_async_save_vs_s3tc_async_save": medians[
                "dcp.async_save + ShardWriter + PinnedStager"
            ]
            / medians["dcp.async_save + S3StorageWriter"],
        },
        "step_time": slowdown,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"state {args.size_mib} MiB in 64 tensors; blocking time, median of {args.reps}:")
    for name, value in medians.items():
        print(f"  {name:<48} {value * 1e3:9.1f} ms  ({value / medians['copy_']:.2f}x copy_)")
    for name, r in slowdown.items():
        extra = (
            f"; upload {r['upload_s']:.1f}s; server CPU {r['server_cpu_s_per_save']:.1f}s/save"
            if "upload_s" in r
            else ""
        )
        print(
            f"step time during upload ({name}): {r['step_s_quiet'] * 1e3:.1f} -> {r['step_s_during_upload'] * 1e3:.1f} ms "
            f"({r['slowdown']:.2f}x over {r['steps_during_upload']} steps{extra})"
        )
    return result


if __name__ == "__main__":
    main()
