"""boto3's and urllib3's errors as shardckpt's: what a failed S3 request means.

Each reply code maps to one error of ``errors.py`` naming the URI (a missing object or bucket,
a denial, a lost race for a conditional put, bytes refused by their checksum), or to a
:class:`TransientError` that the store's :class:`RetryPolicy` retries (throttling, 5xx,
dropped connections). The CRT transport's errors are translated beside its client
(``s3_crt.py``).
"""

from __future__ import annotations

import botocore.exceptions
import urllib3.exceptions

from shardckpt.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ChecksumMismatchError,
    EndpointUnreachableError,
    ObjectExistsError,
    ObjectNotFoundError,
    ShardckptError,
    StoreError,
)
from shardckpt.store.retry import TransientError

_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
DENIED = {
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


def translate(exc: Exception, uri: str, endpoint: str | None) -> Exception:
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
        if code in DENIED:
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
