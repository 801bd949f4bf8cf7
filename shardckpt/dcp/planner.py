"""``ShardSavePlanner``: DCP's default save planner with global planning linear in the items.

DCP's ``DefaultSavePlanner`` builds the global plan with two ``dataclasses.replace`` per item
(to rewrite index hints), hashes every item into its de-duplication tables and checks every
tensor's chunks in pure Python: about 30 us per item, so 30 s for 1,024 ranks x 1,000
tensors, on the coordinator, before a byte moves. This planner makes the same plan and the
same metadata, with the same checks, at a few us per item:

- de-duplication (replicated items) runs only when an item really is on several ranks;
- index hints are not rewritten: they only speed up lookups in ``ShardedTensor`` shards, and
  shardckpt's manifest keys items by (name, offset), which hints do not take part in;
- chunk checks (in bounds, no overlap, the whole tensor covered) are vectorised per tensor;
  tensors sharded other than along one dimension fall back to DCP's own check.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType

from shardckpt.format.chunks import check_chunks

# The final plan of a rank that is the local plan it sent, unchanged (in planner_data, which
# storage writers leave alone; they may add storage_data).
UNCHANGED = "shardckpt: your local plan, unchanged"


class ShardSavePlanner(DefaultSavePlanner):
    """A ``DefaultSavePlanner`` (same arguments, same plans) whose global planning scales to
    thousands of ranks. The :class:`~shardckpt.Checkpointer` uses it; pass it to ``dcp.save``
    as ``planner=ShardSavePlanner()`` at large world sizes.

    ``pause_gc=True`` also pauses Python's cyclic garbage collector from the local plan to
    the final plan: gathering a million write items makes a million objects on the
    coordinator, and the collector scanning them quadruples the time (measured in
    ``benchmarks/scale.py``). The caller must call :meth:`resume_gc` if the save fails
    between the two (the Checkpointer does); nothing is uploaded while it is paused.
    """

    def __init__(self, *args: Any, pause_gc: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pause_gc = pause_gc
        self._paused = False

    def create_local_plan(self) -> SavePlan:
        if self._pause_gc and not self._paused and gc.isenabled():
            gc.disable()
            self._paused = True
        return super().create_local_plan()

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        delta, metadata = super().create_global_plan(all_plans)
        # A rank whose final plan is the very plan it sent gets a marker instead: scattering
        # a million write items back costs the coordinator 14 s at 1,024 ranks.
        delta = [
            SavePlan([], planner_data=UNCHANGED) if final is sent else final
            for final, sent in zip(delta, all_plans, strict=True)
        ]
        return delta, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        try:
            if new_plan.planner_data == UNCHANGED:  # storage_data is the storage writer's
                new_plan = dataclasses.replace(self.plan, storage_data=new_plan.storage_data)
            return super().finish_plan(new_plan)
        finally:
            self.resume_gc()

    def resume_gc(self) -> None:
        """Re-enable the collector if this planner paused it (idempotent)."""
        if self._paused:
            self._paused = False
            gc.enable()

    def _create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        if _has_duplicates(all_plans):
            all_plans = self._dedup_save_plans(all_plans)
        global_plan, metadata = all_plans, _metadata_of(all_plans)
        if self.flatten_state_dict:
            merged: dict[str, Any] = {}
            for plan in reversed(global_plan):  # earlier plans win, as in DCP's ChainMap
                merged.update(plan.planner_data)
            metadata.planner_data = merged
        errors = check_chunks(metadata, whole=len(global_plan) > 1)
        if errors:
            summary = "; ".join(errors)
            raise ValueError(
                f"Failed to validate global plan: {summary[:500]}{'... (truncated)' if len(summary) > 500 else ''}"
            )
        return global_plan, metadata


def _metadata_of(plans: list[SavePlan]) -> Metadata:
    """DCP's ``create_default_global_save_plan`` without index-hint rewriting: every tensor's
    chunks in plan order, every other value once."""
    md: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for plan in plans:
        for item in plan.items:
            fqn = item.index.fqn
            entry = md.get(fqn)
            if item.type != WriteItemType.SHARD and entry is not None:
                raise ValueError(f"{fqn!r} is saved by more than one rank but is not a shard")
            if item.type == WriteItemType.BYTE_IO:
                md[fqn] = BytesStorageMetadata()
                continue
            data = item.tensor_data
            if data is None or data.chunk is None:
                raise ValueError(f"tensor {fqn!r} has no chunk bounds in its write item")
            if entry is None:
                entry = md[fqn] = TensorStorageMetadata(data.properties, data.size, [])
            assert isinstance(entry, TensorStorageMetadata)
            entry.chunks.append(data.chunk)
    return Metadata(md)


def _has_duplicates(plans: list[SavePlan]) -> bool:
    seen = set()
    count = 0
    for plan in plans:
        seen.update(item.index for item in plan.items)
        count += len(plan.items)
    return len(seen) != count
