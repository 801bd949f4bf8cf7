"""``ShardWriter``: a DCP ``StorageWriter`` that writes each rank's shards to an object store
and commits a manifest last.

Each rank packs its items (tensor chunks as raw bytes, other values as DCP serializes them)
into one byte stream, cut into objects of ``object_size`` bytes that are uploaded in
parallel. The coordinator writes the manifest only after every rank's objects are durable
(DCP gathers the write results of all ranks before ``finish``), with a conditional put.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult

from shardckpt._util.abort import AbortSwitch
from shardckpt._util.bytes import crc32c, crc32c_of, each_view, per_view, tensor_bytes, xxh3_of
from shardckpt.dcp.incremental import ContentIndex, Reuse
from shardckpt.errors import (
    CheckpointExistsError,
    ObjectExistsError,
    ObjectNotFoundError,
    SaveFailedError,
)
from shardckpt.format.layout import Layout, new_attempt_id
from shardckpt.format.manifest import Manifest, ObjectRecord, RankItems, StreamRecord
from shardckpt.store import ObjectStore, open_store
from shardckpt.store.base import gather, slice_views
from shardckpt.store.retry import cancelled_by
from shardckpt.uri import parse_uri

logger = logging.getLogger(__name__)

MiB = 1 << 20
# A rank's single write result, carrying its RankReport to the coordinator, has this name.
_REPORT_FQN = "\x00shardckpt.report"


@dataclass(frozen=True)
class WriterOptions:
    """Tuning of a save.

    - ``object_size``: bytes per data object (default 64 MiB). Objects are the unit of
      parallelism; a cap also keeps ranged reads cheap on servers that read whole objects.
    - ``num_threads``: concurrent uploads per rank (default 8).
    - ``fanout``: number of hashed key prefixes for data (default 0: none).
    - ``overwrite``: replace an existing manifest instead of failing (default False).
    """

    object_size: int = 64 * MiB
    num_threads: int = 8
    fanout: int = 0
    overwrite: bool = False

    def object_size_for(self, total: int) -> int:
        """Object size for a rank writing ``total`` bytes: ``object_size``, or smaller (down
        to 8 MiB, whole MiB) so that a small state still gives every upload thread an object."""
        per_thread = -(-total // self.num_threads)
        per_thread = -(-per_thread // MiB) * MiB
        return min(self.object_size, max(8 * MiB, per_thread))

    def __post_init__(self) -> None:
        if self.object_size < 1 * MiB:
            raise ValueError(f"object_size must be at least 1 MiB, got {self.object_size}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")


def split_options(options: dict[str, Any]) -> tuple[WriterOptions, dict[str, Any]]:
    """``options`` as (the writer's, the store's): what a Checkpointer or plugin passes on."""
    names = set(WriterOptions.__dataclass_fields__)
    return WriterOptions(**{k: v for k, v in options.items() if k in names}), {
        k: v for k, v in options.items() if k not in names
    }


class ShardWriter(StorageWriter):
    """Write a DCP checkpoint to ``uri`` (``s3://bucket/prefix``, ``file://`` or a path).

    Options: those of :class:`WriterOptions` and of the store (``endpoint``, ``region``,
    ``profile``, ``transport``, ...). Use with ``dcp.save``, ``dcp.async_save``, or the
    :class:`~shardckpt.Checkpointer`. ``abort_switch.abort()`` (from another thread) stops
    its save: no object is started after it, requests in flight stop, nothing is committed.
    """

    def __init__(self, uri: str | os.PathLike[str], **options: Any) -> None:
        super().__init__()
        self.options, self._store_options = split_options(options)
        self._store: ObjectStore | None = None
        self._layout = Layout(fanout=self.options.fanout)
        self._reset_uri(uri)
        self._attributes: dict[str, Any] = {}
        self.is_coordinator = False
        self.rank = 0
        self.attempt = new_attempt_id()
        self.last_manifest: Manifest | None = None
        self.last_stream: StreamRecord | None = None
        self.base: ContentIndex | None = None  # set: an incremental save against it
        self.last_reused = 0  # bytes the last save reused instead of uploading
        self.abort_switch = AbortSwitch()

    @classmethod
    def for_checkpoint(
        cls,
        store: ObjectStore,
        layout: Layout,
        uri: str,
        attributes: dict[str, Any],
        options: WriterOptions,
        base: ContentIndex | None = None,
        abort_switch: AbortSwitch | None = None,
    ) -> ShardWriter:
        """A writer for the checkpoint at ``layout`` of an open ``store`` (the engine's own way
        in: a Checkpointer or plugin shares one store among its checkpoints)."""
        writer = cls.__new__(cls)
        StorageWriter.__init__(writer)
        writer.options, writer._store_options = options, {}
        writer._store, writer._layout, writer.uri = store, layout, uri
        writer._attributes = attributes
        writer.is_coordinator, writer.rank, writer.attempt = False, 0, new_attempt_id()
        writer.last_manifest = None
        writer.last_stream = None
        writer.base, writer.last_reused = base, 0
        writer.abort_switch = abort_switch or AbortSwitch()
        return writer

    def _reset_uri(self, uri: str | os.PathLike[str]) -> None:
        parse_uri(uri)  # fail fast on a bad URI
        self.uri = os.fspath(uri)
        if self._store is not None:
            self._store.close()
        self._store = None

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = open_store(self.uri, **self._store_options)
        return self._store

    # -- StorageWriter protocol -----------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.uri:
            self._reset_uri(checkpoint_id)
        self.attempt = new_attempt_id()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(
            kwargs.get(
                "rank", dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            )
        )
        self.attempt = new_attempt_id()
        if is_coordinator and not self.options.overwrite:
            # Fail before any rank uploads gigabytes; finish() re-checks atomically.
            self.store.check_conditional_put()
            if self.store.head(self._layout.manifest_key) is not None:
                raise CheckpointExistsError(
                    f"{self.store.uri(self._layout.manifest_key)} already exists; pass overwrite=True to replace it"
                )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.uri, save_id=self.attempt)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        try:
            parse_uri(checkpoint_id)
        except Exception:
            return False
        return True

    def write_data(
        self, plan: SavePlan, planner: SavePlanner
    ) -> torch.futures.Future[list[WriteResult]]:
        chunks: list[list[int] | None] = []
        views: list[memoryview] = []
        for item in plan.items:
            try:
                data = planner.resolve_data(item)
            except Exception as exc:  # e.g. a value that cannot be pickled: name it
                raise SaveFailedError(
                    f"{self.uri}: {item.index.fqn!r} cannot be saved: {type(exc).__name__}: {exc}"
                ) from exc
            if item.type == WriteItemType.BYTE_IO:
                chunks.append(None)
                views.append(data.getbuffer())
            else:
                assert item.tensor_data is not None
                chunk = item.tensor_data.chunk
                chunks.append([*chunk.offsets, *chunk.sizes])
                views.append(tensor_bytes(data))
        report = self.write_stream([item.index.fqn for item in plan.items], chunks, views)
        future: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        future.set_result([WriteResult(MetadataIndex(f"{_REPORT_FQN}.{self.rank}"), 0, report)])
        return future

    @property
    def save_id(self) -> str:
        """DCP's ``StorageMeta.save_id`` of this save (the coordinator's attempt id)."""
        return self.attempt

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_meta = self.storage_meta()  # as DCP's FileSystemWriter does
        manifest = build_manifest(metadata, results, dict(self._attributes))
        self.abort_switch.begin_commit(self.store.uri(self._layout.manifest_key))
        commit(self.store, self._layout, manifest, overwrite=self.options.overwrite)
        self.last_manifest = manifest

    # -- the data path ----------------------------------------------------------------------
    def write_stream(
        self, fqns: list[str], chunks: list[list[int] | None], views: list[memoryview]
    ) -> RankReport:
        """Upload ``views`` (the bytes of the items ``fqns`` / ``chunks``) as this rank's
        stream, except, in an incremental save, those the base already holds; return what
        the coordinator needs for the manifest."""
        lengths = [len(v) for v in views]
        started = time.perf_counter()
        with ThreadPoolExecutor(
            self.options.num_threads, thread_name_prefix="shardckpt-upload"
        ) as pool:
            if self.base is None:
                stream, offsets, crcs = self._upload(pool, views, crc32c_of)
                items = RankItems(self.rank, -1, fqns, chunks, offsets, lengths, crcs)
                report = RankReport(stream, items)
            else:
                report = self._write_incremental(pool, self.base, fqns, chunks, views, lengths)
        logger.debug(
            "rank %d wrote %d bytes in %d objects in %.3fs",
            self.rank,
            sum(o.size for o in report.stream.objects),
            len(report.stream.objects),
            time.perf_counter() - started,
        )
        self.last_stream = report.stream
        return report

    def _upload(
        self,
        pool: ThreadPoolExecutor,
        views: list[memoryview],
        checksum: Callable[[Sequence[memoryview]], list[int]],
    ) -> tuple[StreamRecord, list[int], list[int]]:
        """Pack ``views`` into this rank's stream and upload its objects on ``pool``, with
        ``checksum`` of every view computed beside the uploads. Returns the stream, each
        view's offset in it and its checksum."""
        offsets, total = [], 0
        for view in views:
            offsets.append(total)
            total += len(view)
        object_size = self.options.object_size_for(total)
        count = -(-total // object_size)
        names = [self._layout.data_name(self.attempt, self.rank, i) for i in range(count)]

        def upload(index: int) -> ObjectRecord:
            key = self._layout.key(names[index])
            self.abort_switch.check(self.store.uri(key))
            segments = slice_views(
                views, index * object_size, min(object_size, total - index * object_size), offsets
            )
            crc = crc32c(segments)
            with cancelled_by(self.abort_switch.event):
                self.store.put(key, segments, crc32c=crc)  # checked by the server too
            return ObjectRecord(names[index], sum(len(s) for s in segments), crc)

        uploads = [pool.submit(upload, i) for i in range(count)]
        sums = per_view(pool, checksum, views)
        # On a failed (or aborted) upload, the queued ones are cancelled: the save fails within
        # about one retry deadline, not one per queued object.
        done = gather([*uploads, *sums])
        stream = StreamRecord(self.rank, object_size, tuple(done[:count]))
        return stream, offsets, [c for part in done[count:] for c in part]

    def _write_incremental(
        self,
        pool: ThreadPoolExecutor,
        base: ContentIndex,
        fqns: list[str],
        chunks: list[list[int] | None],
        views: list[memoryview],
        lengths: list[int],
    ) -> RankReport:
        crcs = each_view(pool, crc32c_of, views)
        candidates = [base.candidate(len(v), c) for v, c in zip(views, crcs, strict=True)]
        maybe = [i for i, found in enumerate(candidates) if found is not None]
        confirm = each_view(pool, xxh3_of, [views[i] for i in maybe])
        hashes: list[int] = [0] * len(views)
        reused: dict[int, Reuse] = {}
        for i, xxh3 in zip(maybe, confirm, strict=True):
            hashes[i] = xxh3
            found = candidates[i]
            if found is not None and found.xxh3 == xxh3:
                reused[i] = found
        fresh = [i for i in range(len(views)) if i not in reused]
        stream, fresh_offsets, fresh_hashes = self._upload(pool, [views[i] for i in fresh], xxh3_of)
        # Item streams are local here: 0 is this rank's stream, k > 0 is foreign[k - 1].
        foreign: dict[StreamRecord, int] = {}
        item_streams, offsets = [0] * len(views), [0] * len(views)
        for i, offset, xxh3 in zip(fresh, fresh_offsets, fresh_hashes, strict=True):
            offsets[i], hashes[i] = offset, xxh3
        for i, found in reused.items():
            item_streams[i] = foreign.setdefault(found.stream, len(foreign) + 1)
            offsets[i] = found.offset
        items = RankItems(self.rank, item_streams, fqns, chunks, offsets, lengths, crcs, hashes)
        self.last_reused = sum(lengths[i] for i in reused)
        return RankReport(stream, items, tuple(foreign))


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
