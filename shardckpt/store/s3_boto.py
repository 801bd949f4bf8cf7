"""S3 backend over boto3: universal, thread-pooled, and the only transport with conditional
puts and multipart listing/abort.

botocore's own retries are off: every request goes through one :class:`RetryPolicy`, so the
retry budget is ours and retries can be counted. botocore computes no checksums of its own
("when_required"): an upload carries the CRC32C its caller computed (the writer has it for
every object, at no extra pass), and each part of a multipart upload its own, computed here in
the part's thread (~10 GB/s), so a server that checks them (AWS, SeaweedFS) refuses bytes that
changed on the way instead of storing them.
"""

from __future__ import annotations

import base64
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from shardckpt._util import bytes as _bytes
from shardckpt.errors import (
    AccessDeniedError,
    ChecksumMismatchError,
    ConditionalPutUnsupportedError,
    ObjectExistsError,
    ObjectNotFoundError,
    StoreError,
)
from shardckpt.store.base import (
    Buffer,
    ObjectInfo,
    PendingUpload,
    StoreStats,
    as_byte_views,
    gather,
    slice_views,
    total_size,
)
from shardckpt.store.retry import TransientError, cancel_event
from shardckpt.store.s3_bodies import BufferChain, body_reader
from shardckpt.store.s3_client import boto_client
from shardckpt.store.s3_config import S3Config
from shardckpt.store.s3_errors import DENIED, translate

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Bytes per socket read into a destination view: bounds any temporary the HTTP stack makes.
_READ_CHUNK = 8 << 20
# Whether the server at (endpoint, bucket) honours If-None-Match, probed once per process.
_HONOURS_IF_NONE_MATCH: dict[tuple[str | None, str], bool] = {}
_PROBE_LOCK = threading.Lock()


class BotoS3Store:
    """An :class:`~shardckpt.store.base.ObjectStore` over ``s3://bucket/prefix`` via boto3."""

    def __init__(self, bucket: str, prefix: str, config: S3Config) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.config = config
        self._endpoint = config.resolved_endpoint()
        self._warned_unconditional = False  # the unsafe_unconditional_commit WARNING, once
        self._client = boto_client(config, self._endpoint, self.uri())
        self._parts_pool = ThreadPoolExecutor(
            config.max_concurrency, thread_name_prefix="shardckpt-part"
        )
        self.stats = StoreStats()

    # -- naming -----------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def uri(self, key: str = "") -> str:
        full = self._key(key) if key else self.prefix
        return f"s3://{self.bucket}/{full}" if full else f"s3://{self.bucket}"

    # -- retries and error translation --------------------------------------------------
    def _count_retry(self, exc: TransientError) -> None:
        self.stats.add(retries=1, throttled=int(exc.throttled))

    def _call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            self.stats.add(requests=1)
            try:
                return fn()
            except Exception as exc:  # translated below; nothing is swallowed
                raise translate(exc, uri, self._endpoint) from exc

        return self.config.retry.run(f"{what} {uri}", attempt, self._count_retry)

    # -- ObjectStore ------------------------------------------------------------------
    def put(
        self,
        key: str,
        data: Sequence[Buffer],
        *,
        if_absent: bool = False,
        crc32c: int | None = None,
    ) -> None:
        views = as_byte_views(data)
        size = total_size(views)
        self.stats.add(bytes_put=size)
        if if_absent:
            self.check_conditional_put()
        cancel = cancel_event()
        checksum = {} if crc32c is None else {"ChecksumCRC32C": _base64(crc32c)}
        if size <= self.config.multipart_threshold or if_absent:
            conditional = {"IfNoneMatch": "*"} if if_absent else {}
            self._call(
                "PUT",
                self.uri(key),
                lambda: self._client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=BufferChain(views, cancel, self.uri(key)),
                    ContentLength=size,
                    **conditional,
                    **checksum,
                ),
            )
            return
        self._put_multipart(key, views, size, cancel, checksum)

    def check_conditional_put(self) -> None:
        """Refuse a conditional put to a server that ignores ``If-None-Match`` (unless
        ``unsafe_unconditional_commit``): there, a commit could silently replace another's."""
        where = (self._endpoint, self.bucket)
        with _PROBE_LOCK:  # one probe per endpoint and bucket in the process
            honoured = _HONOURS_IF_NONE_MATCH.get(where)
            if honoured is None:
                honoured = _HONOURS_IF_NONE_MATCH[where] = self._probe_if_none_match()
        if honoured:
            return
        server = f"the S3 endpoint {self._endpoint or 'of AWS'} (bucket {self.bucket})"
        if not self.config.unsafe_unconditional_commit:
            raise ConditionalPutUnsupportedError(
                f"{server} ignores If-None-Match, so two writers of a checkpoint under "
                f"{self.uri()} could both commit and the last would silently win; refusing to "
                "save. Use a server that honours conditional puts, or pass "
                "unsafe_unconditional_commit=True to accept the risk",
                self.uri(),
            )
        if self._warned_unconditional:
            return
        self._warned_unconditional = True
        logger.warning(
            "%s ignores If-None-Match: committing under %s unconditionally "
            "(unsafe_unconditional_commit=True); a concurrent writer would silently win",
            server,
            self.uri(),
        )

    def _probe_if_none_match(self) -> bool:
        """Put a fresh probe object twice with ``If-None-Match: *``, then delete it: whether
        the server refused the second put."""
        key = f".shardckpt-probe-{uuid.uuid4().hex}"

        def put() -> None:
            self._call(
                "PUT",
                self.uri(key),
                lambda: self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=b"", IfNoneMatch="*"
                ),
            )

        put()
        try:
            put()
            return False
        except ObjectExistsError:
            return True
        finally:
            self.delete([key])

    def _put_multipart(
        self,
        key: str,
        views: list[memoryview],
        size: int,
        cancel: threading.Event | None,
        checksum: dict[str, str],
    ) -> None:
        """Upload in parts, each with its CRC32C; given the whole object's (``checksum``), it
        is a FULL_OBJECT CRC32C the server checks at completion, as for a single PUT. Long
        because the protocol's three calls and the abort that undoes them read best together."""
        uri, full = self.uri(key), self._key(key)
        full_object = {"ChecksumType": "FULL_OBJECT"} if checksum else {}
        upload_id = self._call(
            "CreateMultipartUpload",
            uri,
            lambda: self._client.create_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                ChecksumAlgorithm="CRC32C",
                **full_object,
            ),
        )["UploadId"]
        part_size = self.config.part_size_for(size)
        try:

            def upload(number: int) -> dict[str, Any]:
                start = (number - 1) * part_size
                part = slice_views(views, start, min(part_size, size - start))
                length = total_size(part)
                part_crc = _base64(_bytes.crc32c(part))
                reply = self._call(
                    f"UploadPart {number}",
                    uri,
                    lambda: self._client.upload_part(
                        Bucket=self.bucket,
                        Key=full,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=BufferChain(part, cancel, uri),
                        ContentLength=length,
                        ChecksumCRC32C=part_crc,
                    ),
                )
                return {"PartNumber": number, "ETag": reply["ETag"], "ChecksumCRC32C": part_crc}

            numbers = range(1, -(-size // part_size) + 1)
            parts = gather([self._parts_pool.submit(upload, n) for n in numbers])
            self._call(
                "CompleteMultipartUpload",
                uri,
                lambda: self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    **checksum,
                    **full_object,
                ),
            )
        except BaseException:
            # With retries: the failure is often an outage, which the abort must outlast too.
            try:
                self.abort_upload(PendingUpload(key, upload_id, 0.0))
            except Exception as exc:  # the upload is still listed, so gc can abort it later
                logger.warning("could not abort multipart upload %s: %s", uri, exc)
            raise

    def get_into(self, key: str, offset: int, views: Sequence[memoryview]) -> None:
        length = sum(len(v) for v in views)
        if length == 0:
            return
        uri = self.uri(key)
        self.stats.add(bytes_got=length)

        def fetch() -> None:
            reply = self._client.get_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Range=f"bytes={offset}-{offset + length - 1}",
            )
            reader = body_reader(reply["Body"])
            try:
                pos = offset
                for view in views:
                    got = 0
                    while got < len(view):
                        n = reader(view[got : got + _READ_CHUNK])
                        if not n:
                            raise ChecksumMismatchError(
                                f"{uri} is truncated: ended before byte {pos + got}", uri
                            )
                        got += n
                    pos += got
            finally:
                reply["Body"].close()

        self._call("GET", uri, fetch)

    def get(self, key: str) -> bytes:
        def fetch() -> bytes:
            reply = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return reply["Body"].read()

        return self._call("GET", self.uri(key), fetch)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            reply = self._call(
                "HEAD",
                self.uri(key),
                lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key)),
            )
        except ObjectNotFoundError:
            return None
        return ObjectInfo(key, reply["ContentLength"], reply["LastModified"].timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        token: dict[str, str] = {}
        while True:
            page = self._call(
                "LIST",
                self.uri(prefix),
                lambda t=token: self._client.list_objects_v2(
                    Bucket=self.bucket, Prefix=self._key(prefix), **t
                ),
            )
            for item in page.get("Contents", []):
                yield ObjectInfo(
                    self._rel(item["Key"]), item["Size"], item["LastModified"].timestamp()
                )
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def list_prefixes(self, prefix: str = "") -> list[str]:
        found: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self._call(
                "LIST",
                self.uri(prefix),
                lambda t=token: self._client.list_objects_v2(
                    Bucket=self.bucket, Prefix=self._key(prefix), Delimiter="/", **t
                ),
            )
            found += [self._rel(p["Prefix"]).rstrip("/") for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return sorted(found)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            reply = self._call(
                "DELETE",
                self.uri(keys[i]),
                lambda b=batch: self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": b, "Quiet": True}
                ),
            )
            errors = [e for e in reply.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                # DeleteObjects reports per-key failures in a 200 reply, denials included.
                error_class = AccessDeniedError if first.get("Code") in DENIED else StoreError
                raise error_class(
                    f"could not delete {len(errors)} objects, first s3://{self.bucket}/{first['Key']}: "
                    f"{first.get('Code')} {first.get('Message', '')}",
                    self.uri(keys[i]),
                )

    def list_pending_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        marker: dict[str, str] = {}
        while True:
            page = self._call(
                "ListMultipartUploads",
                self.uri(prefix),
                lambda m=marker: self._client.list_multipart_uploads(
                    Bucket=self.bucket, Prefix=self._key(prefix), **m
                ),
            )
            for up in page.get("Uploads", []):
                yield PendingUpload(
                    self._rel(up["Key"]), up["UploadId"], up["Initiated"].timestamp()
                )
            if not page.get("IsTruncated"):
                return
            marker = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }

    def abort_upload(self, upload: PendingUpload) -> None:
        self._call(
            "AbortMultipartUpload",
            self.uri(upload.key),
            lambda: self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._key(upload.key), UploadId=upload.upload_id
            ),
        )

    def close(self) -> None:
        self._parts_pool.shutdown(wait=False)
        self._client.close()


def _base64(crc: int) -> str:
    """A CRC32C as S3 headers carry it: base64 of its 4 big-endian bytes."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()
