"""Round trips through plain dcp.save / dcp.load with real gloo process groups:
save with 4 ranks, load with 1, 2 and 3, on the local store and on S3 (moto)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from shardckpt import ShardReader, ShardWriter
from tests.distributed import run_ranks
from tests.writer.states import assert_same, make_state

pytestmark = pytest.mark.slow

SAVED_SEED = 7


def _save(rank: int, world_size: int, uri: str, options: dict[str, Any]) -> None:
    dcp.save(
        make_state(SAVED_SEED, world_size),
        storage_writer=ShardWriter(uri, object_size=1 << 20, **options),
    )


def _load(rank: int, world_size: int, uri: str, options: dict[str, Any]) -> bool:
    state = make_state(SAVED_SEED + 1000, world_size)  # same structure, other values
    dcp.load(state, storage_reader=ShardReader(uri, **options))
    assert_same(state, make_state(SAVED_SEED, world_size))
    return True


@pytest.fixture(params=["local", "moto-boto3"])
def checkpoint(request: pytest.FixtureRequest, tmp_path) -> tuple[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    from tests.conftest import make_target

    target = make_target(request.param, request, tmp_path)
    return f"{target.uri}/ckpt", target.options


def test_save_4_ranks_load_1_2_3(checkpoint: tuple[str, dict[str, Any]]) -> None:
    uri, options = checkpoint
    run_ranks(_save, 4, uri, options)
    for world_size in (1, 2, 3):
        assert run_ranks(_load, world_size, uri, options) == [True] * world_size


def test_single_process_without_process_group(tmp_path) -> None:  # type: ignore[no-untyped-def]
    uri = str(tmp_path / "ckpt")
    state = make_state(3, 1)
    dcp.save(state, storage_writer=ShardWriter(uri))
    loaded = make_state(4, 1)
    dcp.load(loaded, storage_reader=ShardReader(uri))
    assert_same(loaded, state)


def test_async_save_roundtrip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    uri = str(tmp_path / "ckpt")
    state = make_state(5, 1)
    dcp.async_save(state, storage_writer=ShardWriter(uri)).result()
    loaded = make_state(6, 1)
    dcp.load(loaded, storage_reader=ShardReader(uri))
    assert_same(loaded, state)


def test_large_tensor_spans_objects_and_loads_direct(tmp_path) -> None:  # type: ignore[no-untyped-def]
    uri = str(tmp_path / "ckpt")
    big = torch.randn(3 << 18)  # 3 MiB: spans 3+ objects of 1 MiB
    writer = ShardWriter(uri, object_size=1 << 20)
    dcp.save({"big": big, "small": torch.ones(3)}, storage_writer=writer)
    assert writer.last_manifest is not None and len(writer.last_manifest.objects) == 4
    out = {"big": torch.zeros_like(big), "small": torch.zeros(3)}
    dcp.load(out, storage_reader=ShardReader(uri))
    assert torch.equal(out["big"], big) and torch.equal(out["small"], torch.ones(3))
