"""S3 backend over s3torchconnector's AWS CRT client, for high-bandwidth links to AWS.

The CRT client has no conditional put and no multipart listing/abort: those, and nothing
else, go through the inherited boto3 transport.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence

from s3torchconnectorclient._mountpoint_s3_client import MountpointS3Client, S3Exception

from shardckpt.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ChecksumMismatchError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    StoreError,
)
from shardckpt.store.base import Buffer, ObjectInfo, as_byte_views
from shardckpt.store.retry import TransientError, cancel_event, check_cancelled
from shardckpt.store.s3_boto import BotoS3Store
from shardckpt.store.s3_config import S3Config

# The CRT client copies every write into its own buffers; feed it bounded slices.
_WRITE_SLICE = 8 << 20


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
                    part_size=self.config.part_size,
                    profile=self.config.profile,
                    max_attempts=1,
                )
                self._crt_pid = os.getpid()
            return self._crt

    def _crt_call(self, what: str, uri: str, fn):  # type: ignore[no-untyped-def]
        def attempt():  # type: ignore[no-untyped-def]
            self.stats.add(requests=1)
            try:
                return fn()
            except S3Exception as exc:
                raise _translate_crt(exc, uri, self._endpoint) from exc

        return self.config.retry.run(f"{what} {uri}", attempt, self._count_retry)

    def put(self, key: str, data: Sequence[Buffer], *, if_absent=False, crc32c=None) -> None:
        if if_absent:
            super().put(key, data, if_absent=True)
            return
        views = as_byte_views(data)
        self.stats.add(bytes_put=sum(len(v) for v in views))
        uri, cancel = self.uri(key), cancel_event()

        def upload() -> None:
            stream = self._native.put_object(self.bucket, self._key(key))
            for view in views:
                for start in range(0, len(view), _WRITE_SLICE):
                    check_cancelled(cancel, uri)  # left unclosed: gc aborts its upload
                    stream.write(view[start : start + _WRITE_SLICE].tobytes())
            stream.close()

        self._crt_call("PUT", uri, upload)

    def get_into(self, key: str, offset: int, views: Sequence[memoryview]) -> None:
        # Empty views (zero-size tensors) take no bytes; left in, a trailing one is never
        # "filled" and the read looks short.
        views = [v for v in views if len(v)]
        length = sum(len(v) for v in views)
        if length == 0:
            return
        uri = self.uri(key)
        self.stats.add(bytes_got=length)

        def fetch() -> None:
            chunks = self._native.get_object(self.bucket, self._key(key), offset, offset + length)
            index, filled = 0, 0
            for chunk in chunks:
                pos = 0
                while pos < len(chunk) and index < len(views):
                    n = min(len(chunk) - pos, len(views[index]) - filled)
                    views[index][filled : filled + n] = chunk[pos : pos + n]
                    pos, filled = pos + n, filled + n
                    if filled == len(views[index]):
                        index, filled = index + 1, 0
            if index < len(views):
                raise ChecksumMismatchError(f"{uri} is shorter than the requested range", uri)

        self._crt_call("GET", uri, fetch)

    def get(self, key: str) -> bytes:
        return self._crt_call(
            "GET",
            self.uri(key),
            lambda: b"".join(self._native.get_object(self.bucket, self._key(key))),
        )

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
