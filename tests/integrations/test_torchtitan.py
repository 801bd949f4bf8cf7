"""ShardckptCheckpointManager with torchtitan's own state objects (its ModelWrapper,
OptimizersContainer, LRSchedulersContainer, ParallelAwareDataloader, a train state like its
Trainer's), driven the way torchtitan's training loop drives a checkpoint manager, on the
local store and on moto. torchtitan's models need triton, absent from a CPU-only torch, so
the model is a small nn.Module (torchtitan wraps any module list the same way)."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset

pytest.importorskip("torchtitan", reason="needs the torchtitan extra (Python >= 3.11)")

from torchtitan.components.checkpointer import CheckpointManager  # noqa: E402
from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402
from torchtitan.components.optimizer import (  # noqa: E402
    LRSchedulersContainer,
    OptimizersContainer,
    default_adamw,
)

import shardckpt  # noqa: E402
from shardckpt import Checkpointer, CheckpointExistsError, CheckpointNotFoundError  # noqa: E402
from shardckpt.errors import ConfigError  # noqa: E402
from shardckpt.integrations.torchtitan import (  # noqa: E402
    PREEMPTED_EXIT,
    ShardckptCheckpointManager,
)
from tests.conftest import make_target  # noqa: E402

Manager = ShardckptCheckpointManager


class Tokens(IterableDataset):
    """An endless stream of (input, label) pairs that remembers where it is, as torchtitan's
    text datasets do (``state_dict`` / ``load_state_dict``)."""

    def __init__(self, seed: int) -> None:
        self.seed, self.sample = seed, 0

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.sample)
            self.sample += 1
            x = torch.randn(8, generator=g)
            yield {"input": x}, x.sum(0, keepdim=True)

    def state_dict(self) -> dict[str, Any]:
        return {"sample": self.sample}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sample = state["sample"]


class TrainState:
    """What torchtitan's Trainer puts under ``train_state``."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = state["step"], state["ntokens_seen"]


@dataclass
class Run:
    """One training process: the objects torchtitan's Trainer builds, and its manager."""

    config: Any
    dp_rank: int = 0
    dp_world: int = 1
    model: nn.Module = field(init=False)
    train_state: TrainState = field(init=False)

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        self.optimizers = default_adamw(lr=1e-2, implementation="foreach").build(
            model_parts=[self.model]
        )
        self.lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.5).build(
            optimizers=self.optimizers, training_steps=20
        )
        self.dataloader = ParallelAwareDataloader(
            Tokens(self.dp_rank), self.dp_rank, self.dp_world, batch_size=4
        )
        self.batches: Iterator[Any] | None = None  # made at the first step, after a load
        self.train_state = TrainState()
        self.manager = self.config.build(
            dataloader=self.dataloader,
            model_parts=[self.model],
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self.train_state},
            sd_adapter=None,
            base_folder="",
        )

    def train(self, steps: int, last: int = 20) -> None:
        """``steps`` steps of torchtitan's loop: forward/backward, wait for staging,
        optimizer and scheduler step, then ``save(step, last_step=...)``."""
        if self.batches is None:
            self.batches = iter(self.dataloader)
        for _ in range(steps):
            self.train_state.step += 1
            inputs, labels = next(self.batches)
            loss = nn.functional.mse_loss(self.model(inputs["input"]), labels)
            loss.backward()
            self.manager.maybe_wait_for_staging()
            self.optimizers.step()
            self.optimizers.zero_grad()
            self.lr_schedulers.step()
            self.train_state.ntokens_seen += labels.numel()
            self.manager.save(self.train_state.step, last_step=self.train_state.step == last)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optim": torch.cat([s.flatten() for s in _optimizer_tensors(self.optimizers)]),
            "lr": self.lr_schedulers.state_dict(),
            "train": self.train_state.state_dict(),
            "data": self.dataloader.state_dict(),
        }


def _optimizer_tensors(optimizers: OptimizersContainer) -> list[torch.Tensor]:
    return [
        t
        for optimizer in optimizers.optimizers
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    ]


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["optim"], b["optim"])
    assert (a["lr"], a["train"], a["data"]) == (b["lr"], b["train"], b["data"])


@pytest.fixture(params=["local", "moto-boto3"])
def where(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """A checkpoint folder (URI) and the config fields that reach it."""
    target = make_target(request.param, request, tmp_path)
    return target.uri, {"endpoint": target.options.get("endpoint")}


def _config(where: tuple[str, dict[str, Any]], **fields: Any) -> Manager.Config:
    uri, store = where
    return Manager.Config(enable=True, folder=uri, **{**store, **fields})


def test_resume_continues_bit_exact_and_keeps_latest_k(where: Any) -> None:
    config = _config(where, interval=2, keep_latest_k=2)
    reference = Run(config=Manager.Config())  # disabled: the uninterrupted run
    reference.train(9)
    first = Run(config=config)
    first.train(7)  # saves 2, 4, 6
    assert first.manager.save_future is not None  # step 6 went to the background
    first.manager.close()

    second = Run(config=config)
    assert second.manager.load(step=-1)
    assert second.train_state.step == 6
    second.train(3)  # 7, 8 (a save), 9
    second.manager.close()
    _same(second.fingerprint(), reference.fingerprint())
    assert Checkpointer(where[0], **where[1]).steps() == [6, 8]


def test_fresh_start_explicit_step_and_missing_step(where: Any) -> None:
    config = _config(where, interval=1, keep_latest_k=0)
    run = Run(config=config)
    assert run.manager.load(step=-1) is False  # nothing saved yet: a fresh start
    run.train(3)
    run.manager.close()
    again = Run(config=config)
    assert again.manager.load(step=2)
    assert again.train_state.step == 2
    with pytest.raises(CheckpointNotFoundError, match="step-0000000009"):
        again.manager.load(step=9)
    again.manager.close()


def test_async_modes_and_a_save_in_flight_at_close(where: Any) -> None:
    synchronous = Run(config=_config(where, interval=1, async_mode="disabled"))
    synchronous.train(1)
    assert synchronous.manager.save_future is None  # committed before save returned
    assert synchronous.manager.checkpointer.steps() == [1]
    synchronous.manager.close()

    overlapped = Run(config=_config(where, interval=1, async_mode="async_with_pinned_mem"))
    assert overlapped.manager.load()
    overlapped.train(2)  # steps 2, 3: each optimizer step waits for the last snapshot's copy
    in_flight = overlapped.manager.save_future
    assert in_flight is not None
    overlapped.manager.close()  # waits for step 3 and commits it
    assert in_flight.done()
    assert Checkpointer(where[0], **where[1]).steps() == [1, 2, 3]
    expected = overlapped.fingerprint()
    resumed = Run(config=_config(where, interval=1))
    assert resumed.manager.load()
    _same(resumed.fingerprint(), expected)
    resumed.manager.close()


def test_last_step_is_model_only_in_export_dtype(where: Any) -> None:
    config = _config(where, interval=100, export_dtype="bfloat16")  # last_save_model_only
    run = Run(config=config)
    run.train(3, last=3)
    assert run.manager.save_future is None  # the last save is synchronous
    saved = shardckpt.load(f"{where[0]}/step-0000000003", **where[1])
    assert saved.keys() == run.model.state_dict().keys()
    assert all(v.dtype == torch.bfloat16 for v in saved.values())
    run.manager.close()


def test_a_committed_step_is_never_overwritten(where: Any) -> None:
    config = _config(where, interval=1)
    first = Run(config=config)
    first.train(1)
    first.manager.close()
    rerun = Run(config=config)  # starts over without loading, as with load_step pointing back
    with pytest.raises(CheckpointExistsError, match="step 1"):
        rerun.train(1)
    rerun.manager.close()


def test_resumes_from_the_stock_managers_checkpoint(tmp_path: Any) -> None:
    # keep_latest_k=0: the stock purge asks torch.distributed for the rank
    stock_config = CheckpointManager.Config(
        enable=True, folder=str(tmp_path), interval=2, keep_latest_k=0
    )
    stock = Run(config=stock_config)
    stock.train(3)  # the stock manager writes step-2 (DCP, .metadata)
    stock.manager.close()
    expected = Run(config=stock_config)
    expected.manager.load()
    ours = Run(config=Manager.Config(enable=True, folder=str(tmp_path), interval=2))
    assert ours.manager.load()  # no shardckpt checkpoint yet: the stock one
    assert ours.train_state.step == 2
    _same(ours.fingerprint(), expected.fingerprint())
    ours.train(2)  # step 4, ours; the stock step-2 is not ours to delete
    ours.manager.close()
    assert sorted(os.listdir(tmp_path)) == ["step-0000000004", "step-2"]


def test_preemption_saves_the_current_step_and_exits(where: Any) -> None:
    before = signal.getsignal(signal.SIGTERM)
    run = Run(config=_config(where, interval=100))
    run.train(2)
    os.kill(os.getpid(), signal.SIGTERM)  # noted only; the next save acts on it
    with pytest.raises(SystemExit) as exit_info:
        run.train(1)
    assert exit_info.value.code == PREEMPTED_EXIT
    assert Checkpointer(where[0], **where[1]).steps() == [3]
    assert signal.getsignal(signal.SIGTERM) == before  # close put the handler back


def test_config_errors_and_a_disabled_manager(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="last_save_in_hf"):
        Manager.Config(enable=True, folder=str(tmp_path), last_save_in_hf=True)
    with pytest.raises(ConfigError, match="async_mode"):
        Manager.Config(enable=True, folder=str(tmp_path), async_mode="sometimes")
    off = Run(config=Manager.Config())
    off.train(2)
    assert off.manager.load() is False
    off.manager.close()


def _two_ranks(rank: int, world: int, uri: str, endpoint: str) -> dict[str, Any]:
    """On each of two gloo ranks: the model sharded with FSDP2 (DTensor parameters and
    optimizer state, as torchtitan's data parallelism makes them), save, resume, preempt."""
    from torch.distributed.fsdp import fully_shard

    def sharded() -> Run:
        run = Run(config=Manager.Config(), dp_rank=rank, dp_world=world)
        fully_shard(run.model)
        run.optimizers = default_adamw(lr=1e-2, implementation="foreach").build(
            model_parts=[run.model]
        )
        run.lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
            optimizers=run.optimizers, training_steps=20
        )
        run.manager = Manager.Config(
            enable=True, folder=uri, endpoint=endpoint, interval=2, keep_latest_k=2
        ).build(
            dataloader=run.dataloader,
            model_parts=[run.model],
            optimizers=run.optimizers,
            lr_schedulers=run.lr_schedulers,
            states={"train_state": run.train_state},
            sd_adapter=None,
        )
        return run

    first = sharded()
    first.train(5)  # saves 2 and 4
    first.manager.close()
    second = sharded()
    assert second.manager.load()
    resumed_at = second.train_state.step
    if rank == 1:  # only rank 1 is told to stop: both must save step 5 and exit
        os.kill(os.getpid(), signal.SIGTERM)
    try:
        second.train(1)
    except SystemExit as stop:
        return {"resumed_at": resumed_at, "exit": stop.code, "data": second.dataloader.state_dict()}
    return {"resumed_at": resumed_at, "exit": None}


@pytest.mark.slow
def test_two_gloo_ranks_fsdp_resume_and_preemption(moto: Any) -> None:
    from tests.distributed import run_ranks

    bucket = f"titan-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(bucket)
    uri = f"s3://{bucket}/run"
    results = run_ranks(_two_ranks, 2, uri, moto.endpoint, timeout=120)
    assert [r["resumed_at"] for r in results] == [4, 4]
    assert [r["exit"] for r in results] == [PREEMPTED_EXIT, PREEMPTED_EXIT]
    assert [next(iter(r["data"])) for r in results] == ["dp_rank_0", "dp_rank_1"]
    assert Checkpointer(uri, endpoint=moto.endpoint).steps() == [4, 5]
