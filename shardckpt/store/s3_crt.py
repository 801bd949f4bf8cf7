"""S3 backend over s3torchconnector's AWS CRT client, for high-bandwidth links to AWS.

The CRT client has no conditional put and no multipart listing/abort: those, and nothing
else, go through the inherited boto3 transport.

Settings are s3torchconnector's (``S3ClientConfig``): parts of 8 MiB and a 10 Gbit/s
throughput target, from which the CRT sizes its own connection pool. The CRT cuts every
upload into parts and every ranged read into GETs of one part each (the first alone, to learn
the object's ETag; the rest in parallel, with ``If-Match``), so the writer's and reader's
8 threads (one object each, like s3torchconnector's ``thread_count=8``) keep dozens of
requests in flight. With boto3's 16 MiB parts, our reads were 1.5-2x slower.

Copies: the binding's ``PutObjectStream.write`` takes ``bytes`` only (a memoryview,
bytearray or numpy array is refused), so each part is copied once into a ``bytes`` and the
CRT copies it again into its part buffer, as s3torchconnector's writer does. A read comes back
as one new ``bytes`` per part, which we copy straight into the destination views (numpy's
copy, without the GIL): one copy, where slicing the ``bytes`` made two. Most of the CPU a
read costs beyond boto3's (which reads from the socket into the views) is the kernel zeroing
the fresh pages of those ``bytes`` (45% of the samples in a profile; glibc's
``MALLOC_MMAP_THRESHOLD_=33554432`` in the environment makes them reused memory, 1.2 -> 0.8
CPU-s per GiB, a process-wide setting a library does not make).

Measured with ``benchmarks/transport_bench.py`` (SeaweedFS on loopback, a 2-core machine
shared with the server and other jobs; 1 GiB in 64 float32 tensors, world size 1; speed
relative to s3torchconnector's ``S3StorageWriter(thread_count=8)`` / ``S3StorageReader``,
median of 3 per-rep ratios; CPU-s of the client process per GiB):

=================  ============  ===========  ============  ===========
system             save speed    save CPU-s   load speed    load CPU-s
=================  ============  ===========  ============  ===========
this, crt (was)    1.03x (0.95x) 1.10 (1.32)  1.83x (1.39x) 1.49 (1.53)
this, boto3        1.06x         1.21         3.44x         0.37
s3torchconnector   1.00x         1.26         1.00x         2.48
raw boto3          1.19x         1.12         2.92x         0.39
=================  ============  ===========  ============  ===========

Saves are bound by the server (55-190 MB/s, drifting 2x within a run), so their ratios are
within noise; the client's CPU per GiB saved is equal or lower. Loads: the CRT transport is
1.8x s3torchconnector's and 0.5x boto3's, the price of the binding's copies. Hence boto3 is
the default for every endpoint measured (see ``S3Config``).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from s3torchconnectorclient._mountpoint_s3_client import MountpointS3Client, S3Exception

from shardckpt.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ChecksumMismatchError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    StoreError,
)
from shardckpt.store.base import Buffer, ObjectInfo, as_byte_views, slice_views
from shardckpt.store.retry import TransientError, cancel_event, check_cancelled
from shardckpt.store.s3_boto import BotoS3Store
from shardckpt.store.s3_config import S3Config


class CrtS3Store(BotoS3Store):
    """An :class:`~shardckpt.store.base.ObjectStore` whose data path is the AWS CRT."""

    def __init__(self, bucket: str, prefix: str, config: S3Config) -> None:
        super().__init__(bucket, prefix, config)
        self._crt: MountpointS3Client | None = None
        self._crt_pid = -1
        self._crt_lock = threading.Lock()

    @property
    def _native(self) -> MountpointS3Client:
        # The CRT client is not fork-safe: build one per process.
        with self._crt_lock:
            if self._crt is None or self._crt_pid != os.getpid():
                self._crt = MountpointS3Client(
                    self.config.resolved_region(),
                    endpoint=self._endpoint,
                    force_path_style=bool(self._endpoint),
                    part_size=self.config.resolved_part_size(),
                    throughput_target_gbps=self.config.throughput_target_gbps,
                    profile=self.config.profile,
                    max_attempts=1,
                )
                self._crt_pid = os.getpid()
            return self._crt

    def close(self) -> None:
        with self._crt_lock:
            self._crt = None  # its event-loop threads end with it
        super().close()

    def _crt_call(self, what: str, uri: str, fn):  # type: ignore[no-untyped-def]
        def attempt():  # type: ignore[no-untyped-def]
            self.stats.add(requests=1)
            try:
                return fn()
            except S3Exception as exc:
                raise _translate_crt(exc, uri, self._endpoint) from exc

        return self.config.retry.run(f"{what} {uri}", attempt, self._count_retry)

    def put(
        self,
        key: str,
        data: Sequence[Buffer],
        *,
        if_absent: bool = False,
        crc32c: int | None = None,
    ) -> None:
        # ``crc32c`` (the object's, computed by the writer) goes with the conditional put
        # (boto3) only: the binding's upload takes no checksum.
        if if_absent:
            super().put(key, data, if_absent=True, crc32c=crc32c)
            return
        views = as_byte_views(data)
        self.stats.add(bytes_put=sum(len(v) for v in views))
        uri, cancel = self.uri(key), cancel_event()
        part = self.config.resolved_part_size()

        def upload() -> None:
            stream = self._native.put_object(self.bucket, self._key(key))
            for view in views:
                for start in range(0, len(view), part):
                    check_cancelled(cancel, uri)  # left unclosed: gc aborts its upload
                    # The binding takes ``bytes`` only (not a memoryview or any other
                    # buffer), so each part's bytes are copied once here; the CRT copies
                    # them again into its part buffer.
                    stream.write(view[start : start + part].tobytes())
            stream.close()

        self._crt_call("PUT", uri, upload)

    def get_into(self, key: str, offset: int, views: Sequence[memoryview]) -> None:
        length = sum(len(v) for v in views)
        if length == 0:
            return
        uri = self.uri(key)
        self.stats.add(bytes_got=length)
        starts = list(itertools.accumulate((len(v) for v in views), initial=0))[:-1]

        def fetch() -> None:
            # The CRT splits the range into ranged GETs of ``part_size`` and hands back each
            # part, in order, as a new ``bytes``: one copy each, from there into the views.
            chunks = self._native.get_object(self.bucket, self._key(key), offset, offset + length)
            pos = 0
            for chunk in chunks:
                data = memoryview(chunk)[: length - pos]
                for piece in slice_views(views, pos, len(data), starts):
                    _copy(piece, data[: len(piece)])
                    data = data[len(piece) :]
                pos += len(chunk)
            if pos < length:
                raise ChecksumMismatchError(f"{uri} is shorter than the requested range", uri)

        self._crt_call("GET", uri, fetch)

    def get(self, key: str) -> bytes:
        try:
            return self._crt_call(
                "GET",
                self.uri(key),
                lambda: b"".join(self._native.get_object(self.bucket, self._key(key))),
            )
        except ChecksumMismatchError:
            # The CRT reads a whole object as ranged GETs, the first from byte 0, which an
            # empty object cannot satisfy: SeaweedFS answers 416 where AWS sends the empty
            # object. Its HEAD tells an empty object (one more request, for those alone)
            # from a truncated one. Ranged reads of 0 bytes are never sent (``get_into``).
            info = self.head(key)
            if info is None or info.size:
                raise
            return b""

    def head(self, key: str) -> ObjectInfo | None:
        try:
            reply = self._crt_call(
                "HEAD", self.uri(key), lambda: self._native.head_object(self.bucket, self._key(key))
            )
        except ObjectNotFoundError:
            return None
        return ObjectInfo(
            key,
            reply.size,
            reply.last_modified / 1000 if reply.last_modified > 1e11 else reply.last_modified,
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        pages = self._crt_call(
            "LIST",
            self.uri(prefix),
            lambda: list(self._native.list_objects(self.bucket, self._key(prefix))),
        )
        found = [
            ObjectInfo(self._rel(o.key), o.size, float(o.last_modified))
            for page in pages
            for o in page.object_info
        ]
        return iter(sorted(found, key=lambda o: o.key))

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                self._crt_call(
                    "DELETE",
                    self.uri(key),
                    lambda k=key: self._native.delete_object(self.bucket, self._key(k)),
                )
            except ObjectNotFoundError:
                pass


def _copy(dest: memoryview, src: memoryview) -> None:
    """``dest[:] = src`` with the GIL released (numpy's copy; a memoryview's holds it), so
    the readers' copies run beside the binding's, which hold it."""
    np.copyto(np.frombuffer(dest, np.uint8), np.frombuffer(src, np.uint8))


def _translate_crt(exc: S3Exception, uri: str, endpoint: str | None) -> Exception:
    text = str(exc)
    lower = text.lower()
    if "bucket does not exist" in lower or "nosuchbucket" in lower:
        return BucketNotFoundError(f"{uri}: bucket does not exist ({text})", uri)
    if "key does not exist" in lower or "object was not found" in lower or "nosuchkey" in lower:
        return ObjectNotFoundError(f"{uri} does not exist", uri)
    if "invalidrange" in lower or "response_status: 416" in lower:
        return ChecksumMismatchError(f"{uri} is shorter than the requested range ({text})", uri)
    if any(
        s in lower
        for s in (
            "forbidden",
            "accessdenied",
            "access denied",
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "403",
        )
    ):
        return AccessDeniedError(
            f"{uri}: access denied, check credentials and permissions ({text})", uri
        )
    if any(s in lower for s in ("connection_refused", "dns", "host_not_found", "no route", "tls_")):
        return EndpointUnreachableError(
            f"{uri}: cannot reach the S3 endpoint {endpoint or 'of AWS'} ({text})", uri
        )
    if any(s in lower for s in ("slowdown", "throttl", "503")):
        return TransientError(text, throttled=True)
    # The CRT names a 500 "AWS_ERROR_S3_INTERNAL_ERROR ... internal server error", without the code.
    if any(
        s in lower
        for s in (
            "500",
            "internalerror",
            "internal_error",
            "timeout",
            "reset",
            "closed",
            "broken pipe",
        )
    ):
        return TransientError(text)
    return StoreError(f"{uri}: {text}", uri)
