"""torchtitan's trainer with shardckpt's checkpoint manager: the llama3 debug model, saving to S3.

    torchrun --nproc-per-node 2 examples/torchtitan_train.py \\
        --checkpoint.folder s3://bucket/run --checkpoint.endpoint http://127.0.0.1:9000

(``launch/torchtitan.sh`` starts a local S3 server, trains, kills the run and resumes it.)
Everything but the config is torchtitan's: its ``train.py`` main, its ``Trainer``, its
llama3 ``debugmodel``, its parallelism (FSDP over the ranks). The config is torchtitan's own
``llama3_debugmodel`` with the ``checkpoint`` field switched to
``ShardckptCheckpointManager.Config``: that one line is the integration. The rest of the file
makes the run self-contained: torchtitan's test assets (the c4_test dataset and a tokenizer)
ship with its repository, not its wheel, so the data are random tokens.

On a machine without a GPU (torchtitan 0.3 targets GPUs) three shims let the same run go on
the CPU with gloo: torchtitan falls back to device "cuda" when no accelerator is found, so its
device detection is pointed at "cpu" before torchtitan is imported; its MoE expert-parallel
kernels import triton (absent from CPU builds of torch) unconditionally, so that one module is
replaced by a stub that fails if called (the dense debug model never calls it); its memory
monitor asks ``torch.cpu`` for what only ``torch.cuda`` has (device name, capacity, memory
statistics), so those answers are added. The config then swaps what the CPU cannot run:
FlexAttention (no backward on the CPU) for causal SDPA, the same attention on sequences of one
document; FSDP (its reduce-scatter needs PREMUL_SUM, absent from gloo) for replication (DDP).
With any device, torchtitan 0.3's trainer calls ``torch.distributed.set_timeout``, which torch
2.13 does not have; its private ``_set_pg_timeout`` stands in.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset


def _shims() -> None:
    """Let torchtitan 0.3 run with torch 2.13, and on the CPU (see the module doc)."""
    import torch.distributed as dist

    if not hasattr(dist, "set_timeout"):  # torchtitan's trainer calls it after the first step
        dist.set_timeout = dist.distributed_c10d._set_pg_timeout  # type: ignore[attr-defined]
    if torch.cuda.is_available():
        return
    from torch import _utils

    find_module = _utils._get_device_module
    _utils._get_available_device_type = lambda: "cpu"  # torchtitan's default: "cuda"
    _utils._get_device_module = lambda kind=None: (
        _CpuDevice() if kind == "cpu" else find_module(kind)
    )
    name = "torchtitan.distributed.minimal_async_ep.kernels"
    if name not in sys.modules:
        sys.modules[name] = _NeedsTriton(name)


class _CpuDevice(types.ModuleType):
    """``torch.cpu`` plus what torchtitan asks its device module and only ``torch.cuda``
    answers: an index for ``current_device`` (for barriers), the device's name, capacity and
    memory statistics (for its memory monitor)."""

    def __init__(self) -> None:
        super().__init__("torch.cpu")
        self.memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def __getattr__(self, attr: str) -> Any:
        return getattr(torch.cpu, attr)

    def current_device(self) -> int:
        return 0

    def get_device_name(self, *_: Any) -> str:
        return "cpu"

    def get_device_properties(self, *_: Any) -> Any:
        return types.SimpleNamespace(name="cpu", total_memory=self.memory)

    def memory_stats(self, *_: Any) -> dict[str, int]:
        return {}

    def reset_peak_memory_stats(self, *_: Any) -> None:
        return None

    def empty_cache(self) -> None:
        return None


class _NeedsTriton(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{self.__name__}.{attr} needs triton (a GPU build of torch)")

        return unavailable


_shims()

from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402
from torchtitan.components.tokenizer import BaseTokenizer  # noqa: E402
from torchtitan.models.common.attention import (  # noqa: E402
    FlexAttention,
    ScaledDotProductAttention,
)
from torchtitan.models.llama3.config_registry import llama3_debugmodel  # noqa: E402
from torchtitan.trainer import Trainer  # noqa: E402

from shardckpt.integrations.torchtitan import ShardckptCheckpointManager  # noqa: E402

VOCAB = 2048  # the debug model's vocabulary


class RandomTokens(IterableDataset):
    """Random token sequences, reproducible per data-parallel rank and resumable."""

    def __init__(self, seq_len: int, dp_rank: int) -> None:
        self.seq_len, self.dp_rank, self.sample = seq_len, dp_rank, 0

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            g = torch.Generator().manual_seed(self.dp_rank * 1_000_003 + self.sample)
            self.sample += 1
            tokens = torch.randint(0, VOCAB, (self.seq_len + 1,), generator=g)
            # one document per sequence: torchtitan's masks are built from its positions
            yield {"input": tokens[:-1], "positions": torch.arange(self.seq_len)}, tokens[1:]

    def state_dict(self) -> dict[str, Any]:
        return {"sample": self.sample}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sample = state["sample"]


class RandomTokenLoader(ParallelAwareDataloader):
    """A torchtitan dataloader over :class:`RandomTokens` (stands in for c4_test)."""

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        pass

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        seq_len: int,
        local_batch_size: int,
        **unused: Any,
    ) -> None:
        super().__init__(
            RandomTokens(seq_len, dp_rank), dp_rank, dp_world_size, batch_size=local_batch_size
        )


class NoTokenizer(BaseTokenizer):
    """The trainer builds a tokenizer for the dataloader; random tokens need none."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config, **unused: Any) -> None:
        super().__init__()

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        raise NotImplementedError

    def decode(self, *args: Any, **kwargs: Any) -> str:
        raise NotImplementedError

    def get_vocab_size(self) -> int:
        return VOCAB


def llama3_debug_shardckpt() -> Trainer.Config:
    """torchtitan's llama3 debug config, small enough for the CPU, checkpointing with shardckpt."""
    config = llama3_debugmodel()
    config.checkpoint = ShardckptCheckpointManager.Config(
        enable=True,
        folder=os.environ.get("SHARDCKPT_TITAN_FOLDER", "s3://titan/run"),
        interval=5,
        keep_latest_k=2,
        last_save_model_only=False,
    )
    if not torch.cuda.is_available():
        _use_sdpa(config.model_spec.model)  # type: ignore[union-attr]
        # FSDP's reduce-scatter needs PREMUL_SUM, which gloo lacks: data parallelism by
        # replication (DDP) instead, on the DTensor backend that does not require FSDP meshes
        config.parallelism.data_parallel_replicate_degree = int(os.environ.get("WORLD_SIZE", "1"))
        config.parallelism.data_parallel_shard_degree = 1
        config.parallelism.spmd_backend = "partial_dtensor"
    config.tokenizer = NoTokenizer.Config()
    config.dataloader = RandomTokenLoader.Config()
    config.training.seq_len = 64
    config.training.local_batch_size = 2
    config.training.steps = 30
    config.validator.enable = False
    config.metrics.log_freq = 1
    return config


def _use_sdpa(model: Any) -> None:
    """Swap the model's FlexAttention for causal SDPA: the same attention for sequences of
    one document each, as :class:`RandomTokens` makes them."""
    for _, _, parent, attr in list(model.traverse(FlexAttention.Config)):
        if isinstance(parent, list):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())


def main() -> None:
    from torchtitan.train import main as torchtitan_main

    # torchtitan's main imports the config from --module: this file (its folder is on sys.path)
    module = os.path.splitext(os.path.basename(__file__))[0]
    sys.argv[1:1] = ["--module", module, "--config", "llama3_debug_shardckpt"]
    torchtitan_main()


if __name__ == "__main__":
    main()
