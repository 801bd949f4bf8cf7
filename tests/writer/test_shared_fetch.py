"""Shared fetch: replicated state (every rank loads the same items) is fetched once per job
and broadcast over the process group, instead of once per rank."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from shardckpt import ShardReader, ShardWriter
from tests.distributed import run_ranks
from tests.writer.states import assert_same, make_state

pytestmark = pytest.mark.slow


def _replicated(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    # plain tensors, optimizer state, values: what a data-parallel job holds on every rank
    state = {k: v for k, v in make_state(seed, 1).items() if not k.startswith("dt_")}
    state["big"] = {f"w{i}": torch.randn(256, 256, generator=g) for i in range(8)}  # 2 MiB
    return state


def _load(rank: int, world_size: int, uri: str, options: dict[str, Any], shared: bool) -> int:
    state = _replicated(1)
    reader = ShardReader(uri, shared_fetch=shared, **options)
    dcp.load(state, storage_reader=reader)
    assert_same(state, _replicated(0))
    return reader.store.stats.bytes_got


@pytest.fixture(params=["local", "moto-boto3"])
def saved(request: pytest.FixtureRequest, tmp_path) -> tuple[str, dict[str, Any], int]:  # type: ignore[no-untyped-def]
    from tests.conftest import make_target

    target = make_target(request.param, request, tmp_path)
    uri = f"{target.uri}/ckpt"
    writer = ShardWriter(uri, **target.options)
    dcp.save(_replicated(0), storage_writer=writer, no_dist=True)
    assert writer.last_manifest is not None
    return uri, target.options, writer.last_manifest.total_bytes


def test_each_replicated_byte_is_fetched_once_per_job(saved) -> None:  # type: ignore[no-untyped-def]
    uri, options, total = saved
    alone = run_ranks(_load, 2, uri, options, False)
    shared = run_ranks(_load, 2, uri, options, True)
    data = [got for got in alone]
    assert all(got >= total for got in data)  # without: every rank reads everything
    assert total <= sum(shared) < total + sum(data) // 4  # with: once (plus the manifests)
    assert min(shared) > 0  # and the work is spread over both ranks
