"""One exception hierarchy for shardckpt.

Every message names what is wrong (URI, key, rank) and the cause. Credentials never
appear in a message: only URIs, keys, and the server's error code/text are used.
"""

from __future__ import annotations


class ShardckptError(Exception):
    """Base class of every error raised by shardckpt."""


class InvalidURIError(ShardckptError, ValueError):
    """A URI shardckpt cannot use (unknown scheme, missing bucket, ...)."""


class StoreError(ShardckptError):
    """An object store operation failed. ``uri`` names the object or prefix."""

    def __init__(self, message: str, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri


class BucketNotFoundError(StoreError):
    """The bucket does not exist (or the local root directory is missing)."""


class AccessDeniedError(StoreError):
    """Credentials are missing, wrong, or not allowed to do this."""


class EndpointUnreachableError(StoreError):
    """The S3 endpoint could not be reached (DNS, refused connection, timeout)."""


class ObjectNotFoundError(StoreError):
    """The object does not exist."""


class ObjectExistsError(StoreError):
    """A conditional put found the object already present."""


class RetriesExhaustedError(StoreError):
    """A transient failure (throttling, 5xx, connection reset) outlasted the retry budget."""


class CheckpointError(ShardckptError):
    """A checkpoint-level problem."""


class CheckpointNotFoundError(CheckpointError):
    """Nothing (neither manifest nor data) exists at the checkpoint URI."""


class IncompleteCheckpointError(CheckpointError):
    """Data exists at the checkpoint URI but no manifest: the save never committed."""


class CheckpointExistsError(CheckpointError):
    """A manifest already exists at the URI; pass ``overwrite=True`` to replace it."""


class ManifestError(CheckpointError):
    """The manifest cannot be used: corrupt, not a manifest, or unknown format version."""


class ChecksumMismatchError(CheckpointError):
    """Bytes read back differ from those written (CRC32C mismatch) or are truncated."""


class SaveFailedError(CheckpointError):
    """A (background) save failed; the message names step, rank, key and cause."""


class StateDictMismatchError(CheckpointError):
    """The state dict to load into does not fit the checkpoint (missing key, other shape)."""
