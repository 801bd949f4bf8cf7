"""``ShardWriter``: a DCP ``StorageWriter`` that writes each rank's shards to an object store
and commits a manifest last.

Each rank packs its items (tensor chunks as raw bytes, other values as DCP serializes them)
into one byte stream, cut into objects of ``object_size`` bytes that are uploaded in
parallel. The coordinator writes the manifest only after every rank's objects are durable
(DCP gathers the write results of all ranks before ``finish``), with a conditional put.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult

from shardckpt._bytes import batches, crc32c, crc32c_of, tensor_bytes
from shardckpt.errors import (
    CheckpointExistsError,
    ObjectExistsError,
    ObjectNotFoundError,
    SaveFailedError,
)
from shardckpt.layout import Layout, new_attempt_id
from shardckpt.manifest import ItemLocation, Manifest, ObjectRecord, StreamRecord
from shardckpt.store import ObjectStore, open_store
from shardckpt.store.base import gather, slice_views
from shardckpt.uri import parse_uri

logger = logging.getLogger(__name__)

MiB = 1 << 20
# A write result under this name carries a rank's StreamRecord to the coordinator.
_STREAM_FQN = "\x00shardckpt.stream"


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


def _split_options(options: dict[str, Any]) -> tuple[WriterOptions, dict[str, Any]]:
    names = set(WriterOptions.__dataclass_fields__)
    return WriterOptions(**{k: v for k, v in options.items() if k in names}), {
        k: v for k, v in options.items() if k not in names
    }


class ShardWriter(StorageWriter):
    """Write a DCP checkpoint to ``uri`` (``s3://bucket/prefix``, ``file://`` or a path).

    Options: those of :class:`WriterOptions` and of the store (``endpoint``, ``region``,
    ``profile``, ``transport``, ...). Use with ``dcp.save``, ``dcp.async_save``, or the
    :class:`~shardckpt.Checkpointer`.
    """

    def __init__(self, uri: str | os.PathLike[str], **options: Any) -> None:
        super().__init__()
        self.options, self._store_options = _split_options(options)
        self._store: ObjectStore | None = None
        self._layout = Layout(fanout=self.options.fanout)
        self._reset_uri(uri)
        self._attributes: dict[str, Any] = {}
        self.is_coordinator = False
        self.rank = 0
        self.attempt = new_attempt_id()
        self.last_manifest: Manifest | None = None
        self.last_stream: StreamRecord | None = None

    @classmethod
    def _for_checkpoint(
        cls,
        store: ObjectStore,
        layout: Layout,
        uri: str,
        attributes: dict[str, Any],
        options: WriterOptions,
    ) -> ShardWriter:
        """A writer for one checkpoint of a :class:`Checkpointer`, sharing its store."""
        writer = cls.__new__(cls)
        StorageWriter.__init__(writer)
        writer.options, writer._store_options = options, {}
        writer._store, writer._layout, writer.uri = store, layout, uri
        writer._attributes = attributes
        writer.is_coordinator, writer.rank, writer.attempt = False, 0, new_attempt_id()
        writer.last_manifest = None
        writer.last_stream = None
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
        if (
            is_coordinator
            and not self.options.overwrite
            and self.store.head(self._layout.manifest_key) is not None
        ):
            # Fail before any rank uploads gigabytes; finish() re-checks atomically.
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
        buffers: list[tuple[MetadataIndex, memoryview]] = []
        for item in plan.items:
            try:
                data = planner.resolve_data(item)
            except Exception as exc:  # e.g. a value that cannot be pickled: name it
                raise SaveFailedError(
                    f"{self.uri}: {item.index.fqn!r} cannot be saved: {type(exc).__name__}: {exc}"
                ) from exc
            if item.type == WriteItemType.BYTE_IO:
                buffers.append((item.index, data.getbuffer()))
            else:
                buffers.append((item.index, tensor_bytes(data)))
        results = self.write_buffers(buffers)
        future: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        manifest = build_manifest(metadata, results, dict(self._attributes))
        commit(self.store, self._layout, manifest, overwrite=self.options.overwrite)
        self.last_manifest = manifest

    # -- the data path ----------------------------------------------------------------------
    def write_buffers(self, buffers: list[tuple[MetadataIndex, memoryview]]) -> list[WriteResult]:
        """Upload ``buffers`` as this rank's stream; return DCP write results (one per item,
        plus one carrying the stream's object records to the coordinator)."""
        offsets, total = [], 0
        for _, view in buffers:
            offsets.append(total)
            total += len(view)
        views = [v for _, v in buffers]
        object_size = self.options.object_size_for(total)
        count = -(-total // object_size)
        names = [self._layout.data_name(self.attempt, self.rank, i) for i in range(count)]
        started = time.perf_counter()
        with ThreadPoolExecutor(
            self.options.num_threads, thread_name_prefix="shardckpt-upload"
        ) as pool:

            def upload(index: int) -> ObjectRecord:
                segments = slice_views(
                    views,
                    index * object_size,
                    min(object_size, total - index * object_size),
                    offsets,
                )
                checksum = crc32c(segments)
                self.store.put(self._layout.key(names[index]), segments)
                return ObjectRecord(names[index], sum(len(s) for s in segments), checksum)

            uploads = [pool.submit(upload, i) for i in range(count)]
            sums = [pool.submit(crc32c_of, views[r.start : r.stop]) for r in batches(views)]
            # On a failed upload, the queued ones are cancelled: the save fails within about
            # one retry deadline, not one per queued object.
            done = gather([*uploads, *sums])
            objects, checksums = tuple(done[:count]), [c for part in done[count:] for c in part]
        elapsed = time.perf_counter() - started
        logger.debug(
            "rank %d wrote %d bytes in %d objects in %.3fs", self.rank, total, count, elapsed
        )
        results = [
            WriteResult(index, len(view), ItemLocation(self.rank, off, len(view), crc))
            for (index, view), off, crc in zip(buffers, offsets, checksums, strict=True)
        ]
        stream = StreamRecord(self.rank, object_size, objects)
        self.last_stream = stream
        results.append(WriteResult(MetadataIndex(f"{_STREAM_FQN}.{self.rank}"), total, stream))
        return results


def build_manifest(
    metadata: Metadata, results: list[list[WriteResult]], attributes: dict[str, Any]
) -> Manifest:
    """The manifest of a save from every rank's write results (items and stream records)."""
    streams: dict[int, StreamRecord] = {}
    locations: dict[MetadataIndex, ItemLocation] = {}
    for rank_results in results:
        for wr in rank_results:
            if isinstance(wr.storage_data, StreamRecord):
                streams[wr.storage_data.rank] = wr.storage_data
            else:
                locations[wr.index] = wr.storage_data
    metadata.storage_data = locations
    return Manifest(metadata, streams, world_size=len(results), attributes=attributes)


def commit(store: ObjectStore, layout: Layout, manifest: Manifest, *, overwrite: bool) -> None:
    """Write the manifest: the commit point. Conditional unless ``overwrite``."""
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


def _stored_manifest(store: ObjectStore, key: str) -> bytes | None:
    try:
        return store.get(key)
    except ObjectNotFoundError:
        return None
