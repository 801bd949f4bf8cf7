"""torchtitan's stock checkpoint manager against shardckpt's, on the same state and server.

    python -m benchmarks.titan_bench [--size-mib 64] [--reps 3]

The state is what torchtitan checkpoints, built with its own classes: a model of
``--size-mib`` MiB of float32 parameters (wrapped by its ModelWrapper), its AdamW
``OptimizersContainer`` (two more copies), ``LRSchedulersContainer``, a dataloader and a
train state. Both managers run with ``async_mode="async"`` in one process (a world of one,
gloo), against one local SeaweedFS server, alternating save by save:

- ``stock``: torchtitan's ``CheckpointManager`` with ``folder="s3://..."``: ``dcp.async_save
  (checkpoint_id=...)``, which DCP hands to its ``FsspecWriter`` over s3fs (as torchtitan
  configures it: DCP's defaults); resume scans the folder's ``step-N`` entries through fsspec.
- ``shardckpt``: ``ShardckptCheckpointManager`` on the same server.

Per save: the time ``save`` blocks the training loop, and the time until the checkpoint is
durable (the stock manager: its ``save_future``; ours: the manifest committed). Per resume:
a fresh manager's ``load()`` (discovery and read). s3fs needs a botocore older than this
environment's, so the run re-executes itself in the fsspec peers' environment
(``benchmarks/peer_env.py``) when s3fs is missing here. Writes
``benchmarks/results/titan_bench.json``; on a shared machine read the ratios, not the times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from importlib import metadata, util
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks import peer_env
from benchmarks.spawn import _free_port
from shardckpt.testing.servers import LocalS3Server, start_seaweedfs

MiB = 1 << 20
SYSTEMS = ("stock", "shardckpt")
OUT = os.path.join(os.path.dirname(__file__), "results", "titan_bench.json")


class TrainState:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.step * 4096}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


def build(config: Any, size_mib: int) -> tuple[Any, nn.Module, TrainState]:
    """torchtitan's checkpointed objects around a model of ``size_mib`` MiB, and the
    manager ``config`` builds over them (seeded: every build holds the same bytes)."""
    from torchtitan.components.dataloader import ParallelAwareDataloader
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

    torch.manual_seed(0)
    width = 1024
    layers = max(1, size_mib * MiB // (width * width * 4))
    model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))
    optimizers = default_adamw(implementation="foreach").build(model_parts=[model])
    model(torch.randn(2, width)).sum().backward()
    optimizers.step()  # creates the optimizer state (two more copies of the weights)
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
        optimizers=optimizers, training_steps=1000
    )
    dataloader = ParallelAwareDataloader([torch.zeros(1)] * 8, 0, 1, batch_size=1)  # type: ignore[arg-type]
    train_state = TrainState()
    manager = config.build(
        dataloader=dataloader,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={"train_state": train_state},
        sd_adapter=None,
    )
    return manager, model, train_state


def configs(server: LocalS3Server, bucket: str) -> dict[str, Any]:
    from torchtitan.components.checkpointer import CheckpointManager

    from shardckpt.integrations.torchtitan import ShardckptCheckpointManager

    common = {"enable": True, "interval": 1, "keep_latest_k": 0, "async_mode": "async"}
    return {
        "stock": CheckpointManager.Config(folder=f"s3://{bucket}/stock", **common),
        "shardckpt": ShardckptCheckpointManager.Config(
            folder=f"s3://{bucket}/shardckpt", endpoint=server.endpoint, preemption=False, **common
        ),
    }


def timed(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def run(server: LocalS3Server, size_mib: int, reps: int) -> dict[str, Any]:
    cfgs = configs(server, "titan")
    managers = {name: build(cfg, size_mib) for name, cfg in cfgs.items()}
    blocked: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    committed: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    for step in range(1, reps + 1):
        for name in SYSTEMS:  # alternating, save by save
            manager, model, train_state = managers[name]
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3)  # a training step changed the weights
            train_state.step = step
            began = time.perf_counter()
            manager.save(step)
            blocked[name].append(time.perf_counter() - began)
            manager.maybe_wait_for_saving()
            committed[name].append(time.perf_counter() - began)
    expected = {k: v.clone() for k, v in managers["stock"][1].state_dict().items()}
    for manager, _, _ in managers.values():
        manager.close()
    resume: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    for _ in range(reps):
        for name in SYSTEMS:
            manager, model, train_state = build(cfgs[name], size_mib)
            resume[name].append(timed(manager.load))
            assert train_state.step == reps, (name, train_state.step)
            assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()), name
            manager.close()
    return {"blocked_s": blocked, "committed_s": committed, "resume_s": resume}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=64, help="model parameters, MiB")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    if util.find_spec("s3fs") is None:  # the stock path needs s3fs: rerun where it is
        peer_env.rerun_in_env(sys.argv[1:] if argv is None else argv, "benchmarks.titan_bench")
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)  # the stock async mode needs one
    server = start_seaweedfs()
    try:
        import fsspec.config

        os.environ.update(server.env)
        fsspec.config.conf["s3"] = {"endpoint_url": server.endpoint}  # s3fs's only way in
        server.create_bucket("titan")
        times = run(server, args.size_mib, args.reps)
    finally:
        server.stop()
        dist.destroy_process_group()
    medians = {
        kind: {name: statistics.median(v) for name, v in values.items()}
        for kind, values in times.items()
    }
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchtitan": metadata.version("torchtitan"),
            "s3fs": metadata.version("s3fs"),
            "server": server.version,
        },
        "model_mib": args.size_mib,
        "checkpoint_mib_about": 3 * args.size_mib,  # weights and AdamW's two moments
        "reps": args.reps,
        **times,
        "median_s": medians,
        "ratios_stock_over_shardckpt": {
            kind: m["stock"] / m["shardckpt"] for kind, m in medians.items()
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"model {args.size_mib} MiB (+ AdamW state), median of {args.reps}, SeaweedFS:")
    for kind, m in medians.items():
        ratio = m["stock"] / m["shardckpt"]
        print(
            f"  {kind:<12} stock {m['stock']:7.3f} s  shardckpt {m['shardckpt']:7.3f} s  ({ratio:.1f}x)"
        )
    return result


if __name__ == "__main__":
    main()
