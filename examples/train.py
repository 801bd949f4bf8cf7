"""Train a small transformer with FSDP2 (or DDP) and checkpoint it with shardckpt.

    torchrun --nproc-per-node 2 examples/train.py --ckpt s3://bucket/run --steps 60

Saves asynchronously every ``--save-every`` steps and resumes from the latest committed
checkpoint when started again. Runs on the CPU (gloo) or on GPUs (NCCL + gloo). The data of
each step is derived from the step number, so a resumed run sees exactly the batches an
uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from shardckpt import Checkpointer


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        block = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=4 * dim, batch_first=True, dropout=0.0
        )
        self.blocks = nn.TransformerEncoder(block, layers)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of every position, ``(batch * seq, vocab)``. Flattened before the last
        layer, whose output on a 3-d input would be a view, which FSDP2 warns about on every
        step and rank (in-place ops on a view would skip its hooks; this one is fresh)."""
        return self.out(self.blocks(self.embed(tokens)).flatten(0, 1))


def batch(step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, 256, (8, 33), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def build(parallel: str, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model, sharded with FSDP2 or replicated with DDP, and its optimizer (seeded: every
    run starts from the same weights)."""
    torch.manual_seed(0)
    model = TinyTransformer().to(device)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.blocks.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def state_of(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """What a checkpoint holds: sharded model and optimizer state (DTensors under FSDP2)."""
    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


def resume(ckpt: Checkpointer, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load the latest committed checkpoint, if any; return its step (0 without one)."""
    if ckpt.latest() is None:
        return 0
    state = state_of(model, opt)
    step = ckpt.load(state)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if dist.get_rank() == 0:
        print(f"resumed from step {step}", flush=True)
    return step


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    device: torch.device,
    losses: str | None,
) -> float:
    inputs, targets = batch(step, dist.get_rank(), device)
    loss = nn.functional.cross_entropy(model(inputs), targets.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
    if dist.get_rank() == 0 and losses:
        with open(losses, "a") as f:
            f.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ckpt", required=True, help="checkpoint root: s3://bucket/prefix, file:// or a path"
    )
    parser.add_argument("--steps", type=int, default=60, help="train until this step")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="exit right after this step (simulated preemption)",
    )
    parser.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp")
    parser.add_argument(
        "--losses", default=None, help="append 'step loss' JSON lines here (rank 0)"
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)
    model, opt = build(args.parallel, device)

    with Checkpointer(args.ckpt, keep_last=args.keep_last) as ckpt:
        step = resume(ckpt, model, opt)
        while step < args.steps:
            step += 1
            loss = train_step(model, opt, step, device, args.losses)
            if step % args.save_every == 0:
                handle = ckpt.save(step, state_of(model, opt))
                if dist.get_rank() == 0:
                    print(
                        f"step {step} loss {loss:.4f} checkpoint blocked {handle.stats.blocked_s * 1e3:.1f} ms",
                        flush=True,
                    )
            if step == args.stop_at:
                break
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
