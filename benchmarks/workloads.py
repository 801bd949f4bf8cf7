"""Workloads: how many bytes of state, in how many tensors, over how many ranks.

By name: ``SIZE-COUNT`` (``1gib-64``: 1 GiB of float32 in 64 equal tensors), or a preset:
``10k-small`` (10,000 tensors of 64 KiB) or ``transformer`` (a small
``nn.TransformerEncoder`` and its AdamW state after one step; every rank holds a replica).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_UNITS = {"kib": KiB, "mib": MiB, "gib": GiB}
_SIZE_RE = re.compile(r"^(\d+)(kib|mib|gib)$")
_ELEMENT = 4  # bytes per float32


def parse_size(text: str) -> int:
    """``"64mib"`` -> 67108864. Units: kib, mib, gib (case-insensitive)."""
    match = _SIZE_RE.match(text.strip().lower())
    if match is None:
        raise ValueError(f"bad size {text!r}: expected e.g. 64mib or 1gib")
    return int(match.group(1)) * _UNITS[match.group(2)]


def format_size(size: int) -> str:
    """67108864 -> ``"64mib"`` (the largest unit that divides ``size``)."""
    for unit in ("gib", "mib", "kib"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    raise ValueError(f"{size} bytes is not a whole number of KiB")


@dataclass(frozen=True)
class TransformerShape:
    """The ``transformer`` preset's model: ``layers`` encoder layers of width ``d_model``,
    ``heads`` attention heads and a feed-forward of ``d_ff``; about 12 MiB of parameters,
    so 36 MiB of model and AdamW state per rank."""

    d_model: int = 256
    heads: int = 4
    d_ff: int = 1024
    layers: int = 4


TRANSFORMER = TransformerShape()


def transformer_model(shape: TransformerShape) -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(
        shape.d_model, shape.heads, shape.d_ff, dropout=0.0, batch_first=True
    )
    return torch.nn.TransformerEncoder(layer, shape.layers, enable_nested_tensor=False)


def transformer_state(shape: TransformerShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state dict and its AdamW state after one training step (from
    ``torch.distributed.checkpoint.state_dict.get_state_dict``), flattened to tensors:
    ``model.<fqn>`` and ``optim.<fqn>.<step|exp_avg|exp_avg_sq>``. AdamW's ``param_groups``
    (hyperparameters, not tensors) are left out: the raw and memcpy systems store bytes."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(seed)
    model = transformer_model(shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 16, shape.d_model)).pow(2).mean().backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    flat = {f"model.{k}": v.detach().clone() for k, v in model_state.items()}
    for fqn, entries in optim_state["state"].items():
        for name, value in entries.items():
            flat[f"optim.{fqn}.{name}"] = value.detach().clone()
    return flat


@functools.cache
def _transformer_size(shape: TransformerShape) -> tuple[int, int]:
    """(bytes, tensors) of one replica, without training: each float32 parameter has the
    parameter, ``exp_avg`` and ``exp_avg_sq``, plus a 0-d float32 ``step``."""
    params = list(transformer_model(shape).parameters())
    return 3 * sum(p.numel() for p in params) * _ELEMENT + len(params) * _ELEMENT, 4 * len(params)


PRESETS = ("10k-small", "transformer")


@dataclass(frozen=True)
class Workload:
    """``total_bytes`` of float32 state in ``num_tensors`` equal tensors, split evenly over
    ``world_size`` ranks; each rank holds its share under keys of its own. ``preset``
    (see ``PRESETS``) names a workload made otherwise: ``transformer``'s tensors differ in
    size and each rank holds a whole replica (so ``total_bytes`` counts every rank's)."""

    total_bytes: int
    num_tensors: int
    world_size: int = 1
    preset: str = ""

    def __post_init__(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {list(PRESETS)}")
        if self.num_tensors < 1 or self.num_tensors % self.world_size:
            raise ValueError(
                f"{self.num_tensors} tensors do not split evenly over {self.world_size} ranks"
            )
        if self.preset == "transformer":
            return
        if self.total_bytes % (self.num_tensors * _ELEMENT):
            raise ValueError(
                f"{self.total_bytes} bytes do not split into {self.num_tensors} float32 tensors"
            )

    @classmethod
    def parse(cls, name: str, world_size: int = 1) -> Workload:
        """``"1gib-64"``: 1 GiB in 64 tensors; or a preset name (see ``PRESETS``)."""
        if name == "10k-small":
            return cls(10_000 * 64 * KiB, 10_000, world_size, preset=name)
        if name == "transformer":
            replica_bytes, replica_tensors = _transformer_size(TRANSFORMER)
            return cls(
                replica_bytes * world_size, replica_tensors * world_size, world_size, preset=name
            )
        size, _, count = name.partition("-")
        if not count.isdigit():
            raise ValueError(f"bad workload {name!r}: expected SIZE-COUNT, e.g. 1gib-64")
        return cls(parse_size(size), int(count), world_size)

    @property
    def name(self) -> str:
        if self.preset:
            return self.preset
        return f"{format_size(self.total_bytes)}-{self.num_tensors}"

    @property
    def label(self) -> str:
        return f"{self.name}/ws{self.world_size}"

    @property
    def rank_bytes(self) -> int:
        return self.total_bytes // self.world_size

    def keys(self, rank: int) -> list[str]:
        """The state-dict keys rank ``rank`` holds (distinct across ranks)."""
        per_rank = self.num_tensors // self.world_size
        return [f"rank{rank}.t{i:04d}" for i in range(rank * per_rank, (rank + 1) * per_rank)]

    def make_state(self, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s tensors: random normal float32, reproducible from ``seed``
        (``transformer``: the model and optimizer state, its keys prefixed ``rank<N>.``)."""
        if self.preset == "transformer":
            state = transformer_state(TRANSFORMER, seed * 1_000_003 + rank)
            return {f"rank{rank}.{k}": v for k, v in state.items()}
        numel = self.total_bytes // self.num_tensors // _ELEMENT
        generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        return {key: torch.randn(numel, generator=generator) for key in self.keys(rank)}
