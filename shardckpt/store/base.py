"""The ``ObjectStore`` protocol: bytes and keys, nothing else.

Keys are relative to the store's root (an S3 bucket+prefix or a local directory) and use
``/`` as separator. Data to put is a sequence of buffers (bytes, memoryview, numpy arrays,
a CPU tensor's bytes) that are concatenated on the wire without being joined in memory.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

# Anything exposing the buffer protocol (bytes, memoryview, numpy arrays, ...).
Buffer = bytes | bytearray | memoryview
T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """A stored object: ``key`` relative to the store root, ``size`` in bytes,
    ``mtime`` in seconds since the epoch."""

    key: str
    size: int
    mtime: float


@dataclass(frozen=True)
class PendingUpload:
    """An unfinished multipart upload (S3) or leftover temporary file (local)."""

    key: str
    upload_id: str
    started: float


@dataclass
class StoreStats:
    """Counters of a store's traffic: requests sent (every attempt), retries, throttling
    replies (503 SlowDown), and payload bytes put and got. Thread-safe via :meth:`add`."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0
    bytes_put: int = 0
    bytes_got: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def copy(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                self.requests, self.retries, self.throttled, self.bytes_put, self.bytes_got
            )

    def __sub__(self, other: StoreStats) -> StoreStats:
        return StoreStats(
            self.requests - other.requests,
            self.retries - other.retries,
            self.throttled - other.throttled,
            self.bytes_put - other.bytes_put,
            self.bytes_got - other.bytes_got,
        )


@runtime_checkable
class ObjectStore(Protocol):
    """What every backend provides. All methods are thread-safe."""

    stats: StoreStats

    def uri(self, key: str = "") -> str:
        """The full URI of ``key`` (for messages)."""
        ...

    def put(
        self,
        key: str,
        data: Sequence[Buffer],
        *,
        if_absent: bool = False,
        crc32c: int | None = None,
    ) -> None:
        """Store the concatenation of ``data`` under ``key``, atomically: readers see the old
        object or the whole new one. With ``if_absent``, raise ``ObjectExistsError`` if the
        key already exists (an atomic check on S3 via ``If-None-Match: *``). ``crc32c``, the
        CRC32C of the concatenation where the caller has it, goes with the upload for the
        server to check (``x-amz-checksum-crc32c``): a server that does (AWS, SeaweedFS)
        refuses other bytes, raising ``ChecksumMismatchError``; the local store, with no
        transfer to check, ignores it."""
        ...

    def check_conditional_put(self) -> None:
        """Raise ``ConditionalPutUnsupportedError`` if ``put(..., if_absent=True)`` would not
        be atomic here (an S3 server that ignores ``If-None-Match``), unless the store was
        opened accepting that risk. Writers call it before uploading, so a save that could
        not commit safely fails before its first byte goes up."""
        ...

    def get_into(self, key: str, offset: int, views: Sequence[memoryview]) -> None:
        """Read ``sum(len(v))`` bytes of ``key`` from ``offset`` into ``views``, in order.
        Raises ``ObjectNotFoundError`` or ``ChecksumMismatchError`` if the object is short."""
        ...

    def get(self, key: str) -> bytes:
        """The whole object (for small objects such as manifests)."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """The object's info, or None if it does not exist."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in key order."""
        ...

    def list_prefixes(self, prefix: str = "") -> list[str]:
        """The distinct "directories" directly below ``prefix`` (which ends with ``/`` or is
        empty), without their trailing ``/``, sorted: e.g. the checkpoints under a root."""
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys``; missing keys are not an error."""
        ...

    def list_pending_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        """Unfinished uploads under ``prefix`` (garbage of crashed writers)."""
        ...

    def abort_upload(self, upload: PendingUpload) -> None:
        """Abort an unfinished upload and free its storage."""
        ...

    def close(self) -> None:
        """Release clients and threads."""
        ...


def total_size(data: Sequence[Buffer]) -> int:
    return sum(memoryview(d).nbytes for d in data)


def as_byte_views(data: Sequence[Buffer]) -> list[memoryview]:
    """Flat unsigned-byte views of ``data`` (no copies)."""
    return [memoryview(d).cast("B") for d in data]


def slice_views(
    views: Sequence[memoryview], start: int, length: int, offsets: Sequence[int] | None = None
) -> list[memoryview]:
    """The pieces of the concatenation of ``views`` covering bytes [start, start+length),
    as views (no copies). ``offsets`` (each view's start) makes the search logarithmic."""
    if offsets is None:
        offsets, pos = [], 0
        for v in views:
            offsets.append(pos)
            pos += len(v)
    out = []
    end = start + length
    i = max(bisect.bisect_right(offsets, start) - 1, 0)
    while i < len(views) and offsets[i] < end:
        lo, hi = max(start, offsets[i]), min(end, offsets[i] + len(views[i]))
        if lo < hi:
            out.append(views[i][lo - offsets[i] : hi - offsets[i]])
        i += 1
    return out


def gather(futures: Sequence[Future[T]]) -> list[T]:
    """The results of ``futures``, in order. On the first failure, cancel the futures not yet
    started, wait for the running ones and raise that failure: an operation made of many
    requests fails as soon as one of them has spent its retries, not after every queued
    request has spent its own."""
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    failed = next((f for f in futures if f in done and f.exception() is not None), None)
    if failed is not None:
        for future in pending:
            future.cancel()
        wait(pending)
        failed.result()
    return [f.result() for f in futures]
