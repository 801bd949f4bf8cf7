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

import torch
import torch.distributed as dist
from train import build, resume, state_of, train_step

from shardckpt import Checkpointer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument(
        "--losses", default=None, help="append 'step loss' JSON lines here (rank 0)"
    )
    args = parser.parse_args()

    dist.init_process_group("gloo")
    model, opt = build("fsdp", torch.device("cpu"))
    with Checkpointer(args.ckpt, keep_last=2) as ckpt:
        ckpt.install_sigterm_handler()
        step = resume(ckpt, model, opt)
        while step < args.steps:
            step += 1
            train_step(model, opt, step, torch.device("cpu"), args.losses)
            if ckpt.preempted():  # every rank gets the same answer at the same step
                ckpt.save(step, state_of(model, opt))
                if dist.get_rank() == 0:
                    print(f"preempted: saved step {step}, exiting", flush=True)
                break
            if step % args.save_every == 0:
                ckpt.save(step, state_of(model, opt))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
