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
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult

from shardckpt._util.abort import AbortSwitch
from shardckpt._util.bytes import crc32c, crc32c_of, per_view, tensor_bytes
from shardckpt.dcp.commit import RankReport, build_manifest, commit
from shardckpt.dcp.incremental import ContentIndex, write_incremental
from shardckpt.dcp.store_handle import OnStoreHandle, StoreHandle
from shardckpt.errors import (
    CheckpointExistsError,
    SaveFailedError,
)
from shardckpt.format.layout import Layout, new_attempt_id
from shardckpt.format.manifest import Manifest
from shardckpt.format.records import ObjectRecord, RankItems, StreamRecord
from shardckpt.store import ObjectStore
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
    """``options`` (a writer's, a Checkpointer's, the Lightning plugin's) split into the
    :class:`WriterOptions` and the rest: the store's options."""
    names = set(WriterOptions.__dataclass_fields__)
    return WriterOptions(**{k: v for k, v in options.items() if k in names}), {
        k: v for k, v in options.items() if k not in names
    }


class ShardWriter(OnStoreHandle, StorageWriter):
    """Write a DCP checkpoint to ``uri`` (``s3://bucket/prefix``, ``file://`` or a path).

    Options: those of :class:`WriterOptions` and of the store (``endpoint``, ``region``,
    ``profile``, ``transport``, ...); see ``__init__`` for writing through an open store. Use with ``dcp.save``, ``dcp.async_save``, or the
    :class:`~shardckpt.Checkpointer`. ``abort_switch.abort()`` (from another thread) stops
    its save: no object is started after it, requests in flight stop, nothing is committed.
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        *,
        store: ObjectStore | None = None,
        layout: Layout | None = None,
        attributes: dict[str, Any] | None = None,
        base: ContentIndex | None = None,
        abort_switch: AbortSwitch | None = None,
        **options: Any,
    ) -> None:
        """``store`` and ``layout``: write through this open store (shared, e.g. a
        Checkpointer's) at this checkpoint's layout, instead of opening ``uri``;
        ``attributes``: recorded in the manifest; ``base``: make the save incremental
        against it; ``abort_switch``: one the caller holds."""
        super().__init__()
        self.options, store_options = split_options(options)
        self._handle = StoreHandle(uri, store, store_options)
        self._layout = layout or Layout(fanout=self.options.fanout)
        self._attributes = attributes or {}
        self.is_coordinator = False
        self.rank = 0
        self.attempt = new_attempt_id()
        self.last_manifest: Manifest | None = None
        self.last_stream: StreamRecord | None = None
        self.base = base  # set: an incremental save against it
        self.last_reused = 0  # bytes the last save reused instead of uploading
        self.abort_switch = abort_switch or AbortSwitch()

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
        """A writer for one checkpoint of a :class:`Checkpointer`, sharing its store."""
        return cls(
            uri,
            store=store,
            layout=layout,
            attributes=attributes,
            base=base,
            abort_switch=abort_switch,
            **dataclasses.asdict(options),
        )

    # -- StorageWriter protocol -----------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._handle.move(checkpoint_id)
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
                report, self.last_reused = write_incremental(
                    pool, self.base, self._upload, self.rank, fqns, chunks, views, lengths
                )
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
