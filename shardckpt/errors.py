"""One exception hierarchy for shardckpt.

Every message names what is wrong (URI, key, rank) and the cause. Credentials never
appear in a message: only URIs, keys, and the server's error code/text are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.checkpoint.api import CheckpointException


class ShardckptError(Exception):
    """Base class of every error raised by shardckpt."""


class InvalidURIError(ShardckptError, ValueError):
    """A URI shardckpt cannot use (unknown scheme, missing bucket, an S3 endpoint without
    ``http://`` or ``https://``, ...)."""


class ConfigError(ShardckptError, ValueError):
    """A setting shardckpt cannot use, e.g. an AWS profile that is not configured."""


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
    """The S3 endpoint could not be reached (DNS, refused connection, failed TLS handshake)."""


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


class SaveAbortedError(SaveFailedError):
    """A save was aborted (a second Ctrl-C): nothing was committed; what it uploaded is
    garbage that gc removes."""


class StateDictMismatchError(CheckpointError):
    """The state dict to load into does not fit the checkpoint (missing key, other shape)."""


class ConditionalPutUnsupportedError(StoreError):
    """The S3 server ignores ``If-None-Match``, so a commit could silently replace another's."""


# -- DCP's failures as ours --------------------------------------------------------------------
# DCP wraps every rank's error of a save or load in one CheckpointException, a BaseException
# that ``except Exception`` does not catch; where shardckpt owns the call it raises its own.


def first_cause(exc: CheckpointException) -> BaseException:
    """The error of the lowest failed rank inside DCP's ``CheckpointException``."""
    return sorted(exc.failures.items())[0][1][0]


def describe_failures(exc: CheckpointException) -> str:
    """Every failed rank's error, named by rank."""
    return "; ".join(
        f"rank {rank}: {type(e).__name__}: {e}" for rank, (e, _) in sorted(exc.failures.items())
    )


def from_dcp(exc: CheckpointException, what: str, fallback: type[ShardckptError]) -> ShardckptError:
    """One shardckpt error for DCP's ``exc``: a single rank's shardckpt error as it is;
    otherwise an error naming every failed rank (of their common shardckpt type if they
    share one, else ``fallback``), its cause the first rank's error. ``what``: the operation
    and URI, e.g. ``"load of s3://b/ckpt"``."""
    causes = [e for _, (e, _) in sorted(exc.failures.items())]
    if len(causes) == 1 and isinstance(causes[0], ShardckptError):
        return causes[0]
    kinds = {type(e) for e in causes}
    kind = causes[0].__class__ if len(kinds) == 1 else fallback
    if not issubclass(kind, ShardckptError):
        kind = fallback
    error = kind(f"{what} failed: {describe_failures(exc)}")
    error.__cause__ = causes[0]
    return error
