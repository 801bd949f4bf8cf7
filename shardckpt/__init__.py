"""shardckpt: checkpoint PyTorch training to S3 without stopping training."""

from __future__ import annotations

import logging

from shardckpt.checkpointer import Checkpointer, SaveHandle
from shardckpt.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    ConditionalPutUnsupportedError,
    ConfigError,
    EndpointUnreachableError,
    IncompleteCheckpointError,
    InvalidURIError,
    ManifestError,
    ObjectNotFoundError,
    SaveAbortedError,
    SaveFailedError,
    ShardckptError,
    StateDictMismatchError,
    StoreError,
)
from shardckpt.planner import ShardSavePlanner
from shardckpt.reader import ShardReader
from shardckpt.single import load, save
from shardckpt.staging import PinnedStager
from shardckpt.writer import ShardWriter

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "ConditionalPutUnsupportedError",
    "ConfigError",
    "EndpointUnreachableError",
    "IncompleteCheckpointError",
    "InvalidURIError",
    "ManifestError",
    "ObjectNotFoundError",
    "SaveAbortedError",
    "SaveFailedError",
    "ShardReader",
    "ShardSavePlanner",
    "ShardWriter",
    "ShardckptError",
    "StateDictMismatchError",
    "StoreError",
    "Checkpointer",
    "SaveHandle",
    "PinnedStager",
    "load",
    "save",
]
