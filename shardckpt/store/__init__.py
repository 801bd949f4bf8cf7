"""The ``store`` layer: bytes and keys. See :func:`open_store`."""

from __future__ import annotations

import os
from dataclasses import fields

from shardckpt.store.base import ObjectInfo, ObjectStore, PendingUpload
from shardckpt.store.local import LocalStore
from shardckpt.store.retry import RetryPolicy
from shardckpt.store.s3_config import S3Config
from shardckpt.uri import Location, parse_uri

_S3_OPTIONS = {f.name for f in fields(S3Config)}


def open_store(uri: str | os.PathLike[str] | Location, **options: object) -> ObjectStore:
    """Open the store rooted at ``uri`` (``s3://bucket/prefix``, ``file:///dir`` or a path).

    S3 options are those of :class:`S3Config` (``endpoint``, ``region``, ``profile``,
    ``transport``, ...); local stores take ``fsync`` (default True). Unknown options are
    an error, so a typo never silently falls back to a default.
    """
    location = uri if isinstance(uri, Location) else parse_uri(uri)
    if location.scheme == "file":
        unknown = set(options) - {"fsync"} - _S3_OPTIONS
        if unknown:
            raise TypeError(f"unknown store options {sorted(unknown)}")
        return LocalStore(location.prefix, fsync=bool(options.get("fsync", True)))
    unknown = set(options) - _S3_OPTIONS - {"fsync"}
    if unknown:
        raise TypeError(f"unknown store options {sorted(unknown)}; S3 takes {sorted(_S3_OPTIONS)}")
    config = S3Config(**{k: v for k, v in options.items() if k in _S3_OPTIONS})  # type: ignore[arg-type]
    if config.transport == "crt":
        from shardckpt.store.s3_crt import CrtS3Store

        return CrtS3Store(location.bucket, location.prefix, config)
    from shardckpt.store.s3_boto import BotoS3Store

    return BotoS3Store(location.bucket, location.prefix, config)


__all__ = [
    "ObjectInfo",
    "ObjectStore",
    "PendingUpload",
    "LocalStore",
    "RetryPolicy",
    "S3Config",
    "open_store",
]
