"""Workloads: how many bytes of state, in how many tensors, over how many ranks."""

from __future__ import annotations

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
class Workload:
    """``total_bytes`` of float32 state in ``num_tensors`` equal tensors, split evenly over
    ``world_size`` ranks; each rank holds its share under keys of its own."""

    total_bytes: int
    num_tensors: int
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.num_tensors < 1 or self.num_tensors % self.world_size:
            raise ValueError(
                f"{self.num_tensors} tensors do not split evenly over {self.world_size} ranks"
            )
        if self.total_bytes % (self.num_tensors * _ELEMENT):
            raise ValueError(
                f"{self.total_bytes} bytes do not split into {self.num_tensors} float32 tensors"
            )

    @classmethod
    def parse(cls, name: str, world_size: int = 1) -> Workload:
        """``"1gib-64"``: 1 GiB in 64 tensors."""
        size, _, count = name.partition("-")
        if not count.isdigit():
            raise ValueError(f"bad workload {name!r}: expected SIZE-COUNT, e.g. 1gib-64")
        return cls(parse_size(size), int(count), world_size)

    @property
    def name(self) -> str:
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
        """Rank ``rank``'s tensors: random normal float32, reproducible from ``seed``."""
        numel = self.total_bytes // self.num_tensors // _ELEMENT
        generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        return {key: torch.randn(numel, generator=generator) for key in self.keys(rank)}
