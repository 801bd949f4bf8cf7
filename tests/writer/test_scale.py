"""Scale: ShardSavePlanner makes DCP's plans (checked against DCP's own planner), the
manifest grows linearly with ranks x tensors (simulated large worlds, as
``benchmarks/scale.py`` does), and a 100,000-tensor state dict round-trips in a handful of
requests."""

from __future__ import annotations

import gc
import tempfile

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorProperties,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from benchmarks import scale
from shardckpt import ShardReader, ShardSavePlanner, ShardWriter
from shardckpt.dcp.planner import UNCHANGED


def _item(fqn: str, offsets: list[int], sizes: list[int], shape: list[int]) -> WriteItem:
    chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
    return WriteItem(
        index=MetadataIndex(fqn, offsets),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(chunk, TensorProperties(torch.float32), torch.Size(shape)),
    )


def _bytes(fqn: str) -> WriteItem:
    return WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)


def _plans() -> list[SavePlan]:
    """Four ranks: a row-sharded tensor, a 2x2 grid-sharded one (the slow-path check), a
    replicated one (de-duplicated), a rank-0 value and a per-rank value."""
    plans = []
    for r in range(4):
        items = [
            _item("rows", [r * 3, 0], [3, 5], [12, 5]),
            _item("grid", [r // 2 * 2, r % 2 * 2], [2, 2], [4, 4]),
            _item("replicated", [0], [7], [7]),
            _bytes(f"rng.{r}"),
        ]
        if r == 0:
            items.append(_bytes("step"))
        plans.append(SavePlan(items, planner_data={}))
    return plans


def _global(planner: DefaultSavePlanner, plans: list[SavePlan]) -> tuple[list[set], object]:
    planner.set_up_planner({}, is_coordinator=True)
    finals, metadata = planner.create_global_plan(plans)
    finals = [
        plan if final.planner_data == UNCHANGED else final
        for final, plan in zip(finals, plans, strict=True)
    ]
    return [{item.index for item in p.items} for p in finals], metadata


def test_same_plans_and_metadata_as_dcps_planner() -> None:
    ours, our_md = _global(ShardSavePlanner(), _plans())
    theirs, their_md = _global(DefaultSavePlanner(), _plans())
    assert ours == theirs
    assert sum(MetadataIndex("replicated", [0]) in items for items in ours) == 1
    assert our_md.state_dict_metadata == their_md.state_dict_metadata


@pytest.mark.parametrize(
    "bad, message",
    [
        (_item("rows", [2, 0], [3, 5], [12, 5]), "overlapping chunks"),
        (_item("rows", [10, 0], [3, 5], [12, 5]), "out of bounds"),
        (_item("rows", [3, 0], [2, 5], [12, 5]), "invalid fill"),
    ],
)
def test_bad_chunks_are_refused_like_dcp_does(bad: WriteItem, message: str) -> None:
    plans = _plans()
    plans[1] = SavePlan([bad, *plans[1].items[1:]], planner_data={})
    planner = ShardSavePlanner()
    planner.set_up_planner({}, is_coordinator=True)
    with pytest.raises(ValueError, match=message):
        planner.create_global_plan(plans)


def test_a_failed_save_gives_the_collector_back() -> None:
    planner = ShardSavePlanner(pause_gc=True)
    planner.set_up_planner({"t": torch.ones(2)}, is_coordinator=True)
    planner.create_local_plan()
    assert not gc.isenabled()
    planner.resume_gc()  # what the Checkpointer does when a save fails
    assert gc.isenabled()
    planner.resume_gc()
    assert gc.isenabled()


def test_simulated_large_worlds_grow_linearly() -> None:
    """W = 64 and 256 ranks x 50 tensors, through the real planner, manifest builder, commit
    and parser: every item is in the manifest, and its size per item stays flat."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (64, 256):
            rows.append(scale.simulate(world, 50, tmp, dcp_planner=False, pause_gc=True))
    for row in rows:
        assert row["parsed_items"] == row["items"]
    per_item = [row["manifest_mib"] / row["items"] for row in rows]
    assert per_item[1] == pytest.approx(per_item[0], rel=0.1)
    assert gc.isenabled()


def test_rates_per_prefix_fall_with_the_fanout() -> None:
    flat, spread = (scale.request_rates(1024, 1 << 30, f) for f in (0, 64))
    assert flat["per_prefix_per_s"] > scale.S3_PUT_PER_PREFIX  # one prefix: throttled
    assert spread["per_prefix_per_s"] == pytest.approx(flat["per_prefix_per_s"] / 64)
    assert spread["put_limit_share"] < 0.1


@pytest.mark.slow
def test_100k_tensors_round_trip_in_a_few_requests(tmp_path) -> None:  # type: ignore[no-untyped-def]
    count = 100_000
    state = {f"layer.{i}": torch.full((4,), float(i)) for i in range(count)}
    writer = ShardWriter(tmp_path / "ckpt")
    dcp.save(state, storage_writer=writer, planner=ShardSavePlanner(), no_dist=True)
    assert writer.last_manifest is not None
    assert len(writer.last_manifest.objects) == 1  # 1.6 MB: one object, not 100,000
    assert writer.store.stats.requests <= 3  # existence check, the object, the manifest
    out = {f"layer.{i}": torch.zeros(4) for i in range(count)}
    reader = ShardReader(tmp_path / "ckpt")
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert all(torch.equal(out[k], state[k]) for k in state)
    assert reader.store.stats.requests <= 3  # the manifest, one ranged GET
