"""Deterministic state dicts for round-trip tests: every common dtype, odd shapes, DTensor
shards, an optimizer state and non-tensor values."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
]


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def _model_and_optimizer(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def make_state(seed: int, world_size: int) -> dict[str, Any]:
    """The state every rank holds; DTensors are sharded over the current process group
    (or plain tensors in a single process without one)."""
    state: dict[str, Any] = {
        f"t_{str(d).removeprefix('torch.')}": _tensor((33, 7), d, seed + i)
        for i, d in enumerate(DTYPES)
    }
    state["scalar"] = torch.tensor(seed + 0.5)
    state["empty"] = torch.empty(0, 5)
    state["noncontig"] = _tensor((12, 9), torch.float32, seed + 100).t()
    state["extra"] = {
        "step": seed,
        "name": f"run-{seed}",
        "ratios": [0.5, 1.5],
        "rng": torch.Generator().manual_seed(seed).get_state(),
    }
    state.update(_model_and_optimizer(seed))
    if dist.is_initialized():
        mesh = init_device_mesh("cpu", (world_size,))
        state["dt_rows"] = distribute_tensor(
            _tensor((37, 16), torch.float32, seed + 200), mesh, [Shard(0)]
        )
        state["dt_cols_bf16"] = distribute_tensor(
            _tensor((10, 6), torch.bfloat16, seed + 300), mesh, [Shard(1)]
        )
    return state


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a nested state, DTensors gathered to full tensors."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list | tuple):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return {prefix: value}


def assert_same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Bit-exact equality of two states (same keys, dtypes, shapes, bytes)."""
    a, e = flatten(actual), flatten(expected)
    assert a.keys() == e.keys(), f"keys differ: {sorted(a.keys() ^ e.keys())}"
    for k in e:
        if isinstance(e[k], torch.Tensor):
            assert isinstance(a[k], torch.Tensor), k
            assert a[k].dtype == e[k].dtype and a[k].shape == e[k].shape, (
                k,
                a[k].dtype,
                a[k].shape,
                e[k].dtype,
                e[k].shape,
            )
            assert torch.equal(
                a[k].reshape(-1).view(torch.uint8) if a[k].numel() else a[k],
                e[k].contiguous().reshape(-1).view(torch.uint8) if e[k].numel() else e[k],
            ), f"{k} differs"
        else:
            assert a[k] == e[k], (k, a[k], e[k])


def fingerprint(state: dict[str, Any]) -> dict[str, Any]:
    """A small stand-in for a state, equal iff the states are bit-exact equal: each tensor
    becomes (dtype, shape, CRC32C of its bytes)."""
    import crc32c

    out: dict[str, Any] = {}
    for k, v in flatten(state).items():
        if isinstance(v, torch.Tensor):
            data = (
                v.detach().contiguous().reshape(-1).view(torch.uint8).numpy() if v.numel() else b""
            )
            out[k] = (v.dtype, tuple(v.shape), crc32c.crc32c(data))
        else:
            out[k] = v
    return out
