"""Preemption: on SIGTERM (spot reclaim, Slurm requeue, Kubernetes eviction) finish the save
in flight, take a final checkpoint at a step every rank agrees on, and exit; the restarted
job resumes from it.

    torchrun --nproc-per-node 2 examples/preemption.py --ckpt s3://bucket/run --steps 1000
    # ... kill -TERM <torchrun pid>; then start the same command again to resume

torchrun forwards SIGTERM to every worker. The handler only sets a flag; ranks agree on it
with ``Checkpointer.preempted()`` at step boundaries, so all of them save the same step.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from train import TinyTransformer, batch

from shardckpt import Checkpointer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--losses", default=None, help="append 'step loss' JSON lines here (rank 0)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = TinyTransformer()
    for layer in model.blocks.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    with Checkpointer(args.ckpt, keep_last=2) as ckpt:
        ckpt.install_sigterm_handler()

        def state() -> dict:
            model_sd, optim_sd = get_state_dict(model, opt)
            return {"model": model_sd, "optim": optim_sd}

        step = 0
        if ckpt.latest() is not None:
            sd = state()
            step = ckpt.load(sd)
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            if rank == 0:
                print(f"resumed from step {step}", flush=True)
        while step < args.steps:
            step += 1
            inputs, targets = batch(step, rank, "cpu")
            loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            if rank == 0 and args.losses:
                with open(args.losses, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
            if ckpt.preempted():  # every rank gets the same answer at the same step
                ckpt.save(step, state())
                if rank == 0:
                    print(f"preempted: saved step {step}, exiting", flush=True)
                break
            if step % args.save_every == 0:
                ckpt.save(step, state())
    dist.destroy_process_group()
    sys.exit(0)


if __name__ == "__main__":
    main()
