"""shardckpt: checkpoint PyTorch training to S3 without stopping training."""

from __future__ import annotations

import logging

from shardckpt.dcp.planner import ShardSavePlanner
from shardckpt.dcp.reader import ShardReader
from shardckpt.dcp.staging import PinnedStager
from shardckpt.dcp.writer import ShardWriter
from shardckpt.engine.checkpointer import Checkpointer, SaveHandle
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
from shardckpt.tools.single import load, save

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
