"""The commit: a save's manifest, built from every rank's report and written last.

Each rank reports its stream's objects and its items (:class:`RankReport`, one per rank: DCP
gathers them to the coordinator), the coordinator builds the manifest from them, checks that
every object it names is still there, and PUTs it with ``If-None-Match: *``: exactly one writer
of a checkpoint wins, and a checkpoint exists only once its manifest does.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt.errors import (
    CheckpointExistsError,
    ObjectExistsError,
    ObjectNotFoundError,
    SaveFailedError,
)
from shardckpt.format.layout import Layout
from shardckpt.format.manifest import Manifest
from shardckpt.format.records import RankItems, StreamRecord
from shardckpt.store import ObjectStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankReport:
    """What a rank sends the coordinator after its upload (DCP gathers one per rank): its
    stream's objects and its items, as columns (one object, not one per item: gathering a
    million write results would cost more than the rest of the commit). In an incremental
    save, ``foreign`` lists the earlier streams its items reuse; the items' streams are then
    local (0: its own, k: ``foreign[k - 1]``)."""

    stream: StreamRecord
    items: RankItems
    foreign: tuple[StreamRecord, ...] = ()


def build_manifest(
    metadata: Metadata, results: list[list[WriteResult]], attributes: dict[str, Any]
) -> Manifest:
    """The manifest of a save from every rank's report: the ranks' streams first (stream
    ``r`` is rank ``r``'s), then the earlier streams incremental saves reuse, once each."""
    reports = [wr.storage_data for rank_results in results for wr in rank_results]
    if not all(isinstance(r, RankReport) for r in reports):
        raise SaveFailedError("a rank reported write results that ShardWriter did not make")
    reports.sort(key=lambda r: r.stream.rank)
    written = sum(len(r.items.fqns) for r in reports)
    planned = sum(
        len(md.chunks) if isinstance(md, TensorStorageMetadata) else 1
        for md in metadata.state_dict_metadata.values()
    )
    if written != planned:
        raise SaveFailedError(f"the ranks wrote {written} items, but the plan has {planned}")
    streams = [r.stream for r in reports]
    foreign: dict[StreamRecord, int] = {}
    tables = []
    for own, report in enumerate(reports):
        if isinstance(report.items.stream, int):
            tables.append(dataclasses.replace(report.items, stream=own))
            continue
        mapping = [own] + [
            foreign.setdefault(s, len(streams) + len(foreign)) for s in report.foreign
        ]
        tables.append(
            dataclasses.replace(report.items, stream=[mapping[k] for k in report.items.stream])
        )
    return Manifest(
        metadata, streams + list(foreign), tables, world_size=len(results), attributes=attributes
    )


def commit(store: ObjectStore, layout: Layout, manifest: Manifest, *, overwrite: bool) -> None:
    """Write the manifest: the commit point. Conditional unless ``overwrite``. First check
    that every object it names is there (see :func:`check_objects_exist`)."""
    check_objects_exist(store, layout, manifest)
    key = layout.manifest_key
    data = manifest.to_json()
    try:
        store.put(key, [data], if_absent=not overwrite)
    except ObjectExistsError:
        if _stored_manifest(store, key) == data:
            # Our first attempt was stored but its reply was lost; the retry found it.
            logger.info(
                "%s: the commit's reply was lost, but the stored manifest is ours", store.uri(key)
            )
        else:
            raise CheckpointExistsError(
                f"{store.uri(key)} already exists (another writer committed first); "
                "this save's data is garbage for gc; pass overwrite=True to replace a checkpoint"
            ) from None
    logger.info(
        "committed %s: %d ranks, %d objects, %d bytes",
        store.uri(key),
        manifest.world_size,
        len(manifest.objects),
        manifest.total_bytes,
    )


def check_objects_exist(store: ObjectStore, layout: Layout, manifest: Manifest) -> None:
    """Raise :class:`SaveFailedError` naming the key unless every object ``manifest`` names
    exists with its size. gc deletes unreferenced data older than its grace period, so the
    data of a save that outlasts it may be gone; the manifest must never name deleted data.
    One LIST for the checkpoint's own objects, a HEAD for each object of a sibling
    checkpoint that an incremental save reuses."""
    own = {o.key: o.size for o in store.list(layout.data_prefix)}

    def size(key: str, home: str) -> int | None:
        if not home:
            return own.get(key)
        info = store.head(key)
        return None if info is None else info.size

    wanted = [
        (layout.resolve(o.key, s.home), s.home, o.size) for s in manifest.streams for o in s.objects
    ]
    with ThreadPoolExecutor(8, thread_name_prefix="shardckpt-check") as pool:
        found = list(pool.map(lambda w: size(w[0], w[1]), wanted))
    for (key, _, expected), got in zip(wanted, found, strict=True):
        if got != expected:
            state = "is missing" if got is None else f"has {got} bytes, not {expected}"
            raise SaveFailedError(
                f"{store.uri(key)} {state} at commit time (deleted by gc while the save ran "
                "longer than its grace period?); no manifest was written"
            )


def _stored_manifest(store: ObjectStore, key: str) -> bytes | None:
    try:
        return store.get(key)
    except ObjectNotFoundError:
        return None
