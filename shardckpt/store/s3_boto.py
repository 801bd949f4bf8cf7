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
import io
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.handlers
import botocore.loaders
import botocore.session
import urllib3.exceptions

from shardckpt._util import bytes as _bytes
from shardckpt.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ChecksumMismatchError,
    ConditionalPutUnsupportedError,
    ConfigError,
    EndpointUnreachableError,
    ObjectExistsError,
    ObjectNotFoundError,
    ShardckptError,
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
from shardckpt.store.retry import TransientError, cancel_event, check_cancelled
from shardckpt.store.s3_config import S3Config

logger = logging.getLogger(__name__)
T = TypeVar("T")

_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "403",
}
_EXISTS = {"PreconditionFailed", "ConditionalRequestConflict", "412"}
_BAD_DIGEST = {"BadDigest"}  # the bytes received do not match the x-amz-checksum-* sent
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "503"}
_TRANSIENT_NET = (
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    urllib3.exceptions.IncompleteRead,
    ConnectionError,
)


# A new botocore session parses the service models (JSON) for its first client: 0.1-0.5 s
# per store. Sessions share one loader, which caches them, so that is paid once per process;
# each store still gets a session of its own, so credentials are resolved afresh.
_LOADER = botocore.loaders.create_loader()
_SESSIONS_LOCK = threading.Lock()
# Bytes per socket read into a destination view: bounds any temporary the HTTP stack makes.
_READ_CHUNK = 8 << 20
# Whether the server at (endpoint, bucket) honours If-None-Match, probed once per process.
_HONOURS_IF_NONE_MATCH: dict[tuple[str | None, str], bool] = {}
_PROBE_LOCK = threading.Lock()


def _session(profile: str | None) -> boto3.session.Session:
    core = botocore.session.get_session()
    core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core, profile_name=profile)


def _body_reader(body: Any) -> Callable[[memoryview], int]:
    """A ``readinto`` for a GET body that writes straight into the destination. urllib3's own
    ``readinto`` reads into a temporary and copies; http.client's underneath (used when the
    body is not content-encoded) reads from the socket into the view."""
    raw = body._raw_stream
    fp = getattr(raw, "_fp", None)
    if fp is not None and not raw.headers.get("content-encoding") and hasattr(fp, "readinto"):
        return fp.readinto
    return raw.readinto


class BufferChain(io.RawIOBase):
    """A seekable, read-only file over a sequence of byte views, for request bodies:
    botocore streams it without the buffers ever being joined. Once ``cancel`` is set,
    reading raises :class:`SaveAbortedError` naming ``uri``: the request stops mid-body."""

    def __init__(
        self,
        views: Sequence[memoryview],
        cancel: threading.Event | None = None,
        uri: str = "",
    ) -> None:
        self._cancel, self._uri = cancel, uri
        self._views = [v for v in views if len(v)]
        self._starts: list[int] = []
        pos = 0
        for v in self._views:
            self._starts.append(pos)
            pos += len(v)
        self._size = pos
        self._pos = 0
        self._index = 0

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(base + offset, 0), self._size)
        self._index = 0
        while self._index + 1 < len(self._views) and self._starts[self._index + 1] <= self._pos:
            self._index += 1
        return self._pos

    def read(self, size: int = -1) -> bytes | memoryview:  # type: ignore[override]
        check_cancelled(self._cancel, self._uri)
        if self._pos >= self._size:
            return b""
        while self._starts[self._index] + len(self._views[self._index]) <= self._pos:
            self._index += 1
        view = self._views[self._index]
        start = self._pos - self._starts[self._index]
        end = len(view) if size is None or size < 0 else min(len(view), start + size)
        self._pos += end - start
        # A view, not a copy: http.client sends it with sendall, which releases the GIL.
        return view[start:end]

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)


class BotoS3Store:
    """An :class:`~shardckpt.store.base.ObjectStore` over ``s3://bucket/prefix`` via boto3."""

    def __init__(self, bucket: str, prefix: str, config: S3Config) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.config = config
        self._endpoint = config.resolved_endpoint()
        self._warned_unconditional = False  # the unsafe_unconditional_commit WARNING, once
        try:
            with _SESSIONS_LOCK:  # creating clients from one session is not thread-safe
                self._client = _session(config.profile).client(
                    "s3",
                    endpoint_url=self._endpoint,
                    region_name=config.resolved_region(),
                    config=botocore.config.Config(
                        s3={"addressing_style": "path" if self._endpoint else "auto"},
                        retries={"total_max_attempts": 1},
                        max_pool_connections=max(64, 4 * config.max_concurrency),
                        connect_timeout=config.connect_timeout,
                        read_timeout=config.read_timeout,
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                    ),
                )
        except botocore.exceptions.ProfileNotFound as exc:
            raise self._profile_error(exc) from None
        # No "Expect: 100-continue" (botocore adds it to every S3 PUT): after any early final
        # response to it (an empty body on Go servers such as rclone and MinIO, or an early
        # 412/403), botocore mis-parses the next such response on that pooled connection,
        # which stalls for read_timeout and then retries (boto/botocore#3755).
        self._client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
        self._parts_pool = ThreadPoolExecutor(
            config.max_concurrency, thread_name_prefix="shardckpt-part"
        )
        self.stats = StoreStats()

    def _profile_error(self, exc: botocore.exceptions.ProfileNotFound) -> ConfigError:
        name = exc.kwargs.get("profile", self.config.profile)
        source = "" if self.config.profile else " (from AWS_PROFILE)"
        return ConfigError(
            f"{self.uri()}: AWS profile {name!r}{source} is not configured: it is in neither "
            "the AWS config file nor the credentials file (~/.aws/config, ~/.aws/credentials, "
            "or AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE)"
        )

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
                raise _translate(exc, uri, self._endpoint) from exc

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
        is a FULL_OBJECT CRC32C the server checks at completion, as for a single PUT."""
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
            reader = _body_reader(reply["Body"])
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
                error_class = AccessDeniedError if first.get("Code") in _DENIED else StoreError
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


def _translate(exc: Exception, uri: str, endpoint: str | None) -> Exception:
    """Map a boto/urllib3 error to a shardckpt error or a :class:`TransientError`."""
    if isinstance(exc, ShardckptError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        text = f"{code} {error.get('Message', '')}".strip() or f"HTTP {status}"
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"{uri}: bucket does not exist ({text})", uri)
        if code in _NOT_FOUND:
            return ObjectNotFoundError(f"{uri} does not exist", uri)
        if code in _DENIED:
            return AccessDeniedError(
                f"{uri}: access denied, check credentials and permissions ({text})", uri
            )
        if code in _EXISTS:
            return ObjectExistsError(f"{uri} already exists", uri)
        if code in _BAD_DIGEST:
            # Not retried: bytes that changed before they were sent (a buffer written during
            # its upload) fail again, and a corruption on the way must be seen, not masked.
            return ChecksumMismatchError(
                f"{uri}: the server refused the upload: the bytes it received do not match "
                f"the CRC32C computed over them before sending ({text}); corrupted on the way, "
                "or the buffer changed while it was sent",
                uri,
            )
        if code == "InvalidRange":
            return ChecksumMismatchError(f"{uri} is shorter than the requested range ({text})", uri)
        if code in _THROTTLED or status >= 500 or code in ("InternalError", "RequestTimeout"):
            return TransientError(
                f"{text} (HTTP {status})", throttled=code in _THROTTLED or status == 503
            )
        return StoreError(f"{uri}: {text} (HTTP {status})", uri)
    server = endpoint or "of AWS"
    if isinstance(exc, botocore.exceptions.SSLError):
        # Not retried: a handshake fails the same way every time.
        return EndpointUnreachableError(
            f"{uri}: cannot reach the S3 endpoint {server}: the TLS handshake failed ({exc}); "
            "does the server speak plain http://, or is its certificate not trusted?",
            uri,
        )
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return EndpointUnreachableError(
            f"{uri}: cannot reach the S3 endpoint {server} ({exc})", uri
        )
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return AccessDeniedError(f"{uri}: no usable AWS credentials found ({exc})", uri)
    if isinstance(exc, _TRANSIENT_NET):
        return TransientError(f"{type(exc).__name__}: {exc}")
    return exc
