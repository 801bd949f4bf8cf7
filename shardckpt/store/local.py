"""Local filesystem backend: the embedded default that needs no server.

A put writes a temporary file beside the target, fsyncs it and renames it into place, so a
reader never sees a partial object; a conditional put links the temporary file to the target
name, which fails atomically if the target exists.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from shardckpt.errors import (
    AccessDeniedError,
    ChecksumMismatchError,
    InvalidURIError,
    ObjectExistsError,
    ObjectNotFoundError,
    StoreError,
)
from shardckpt.store.base import Buffer, ObjectInfo, PendingUpload, StoreStats, as_byte_views

TMP_MARK = ".tmp-shardckpt-"
_CREATE_TRIES = 5


class LocalStore:
    """An :class:`~shardckpt.store.base.ObjectStore` over the directory ``root``."""

    def __init__(self, root: str, *, fsync: bool = True) -> None:
        self.root = os.path.abspath(root)
        self._fsync = fsync
        self.stats = StoreStats()

    def uri(self, key: str = "") -> str:
        return f"file://{os.path.join(self.root, key)}" if key else f"file://{self.root}"

    def _path(self, key: str) -> str:
        # Keys come from manifests, which may come from an untrusted copy: never let one
        # name a file outside the root (no '..', no absolute paths, no symlinked escapes).
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidURIError(f"invalid object key {key!r} under {self.uri()}")
        path = os.path.join(self.root, *parts)
        real = os.path.realpath(path)
        if real != path and not real.startswith(os.path.realpath(self.root) + os.sep):
            raise InvalidURIError(f"object key {key!r} escapes {self.uri()} through a symlink")
        return path

    def put(
        self,
        key: str,
        data: Sequence[Buffer],
        *,
        if_absent: bool = False,
        crc32c: int | None = None,  # nothing crosses a wire here: no transfer to check
    ) -> None:
        path = self._path(key)
        views = as_byte_views(data)
        self.stats.add(requests=1, bytes_put=sum(len(v) for v in views))
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}{TMP_MARK}{uuid.uuid4().hex}")
        try:
            with _create(directory, tmp) as f:
                for view in views:
                    f.write(view)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise ObjectExistsError(
                        f"{self.uri(key)} already exists", self.uri(key)
                    ) from None
            else:
                os.replace(tmp, path)
        except OSError as exc:
            raise _translate(exc, self.uri(key)) from exc
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def get_into(self, key: str, offset: int, views: Sequence[memoryview]) -> None:
        self.stats.add(requests=1, bytes_got=sum(len(v) for v in views))
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                f.seek(offset)
                for view in views:
                    got = 0
                    while got < len(view):
                        n = f.readinto(view[got:])
                        if not n:
                            raise ChecksumMismatchError(
                                f"{self.uri(key)} is truncated: ended before byte {offset + got}"
                            )
                        got += n
                    offset += got
        except OSError as exc:
            raise _translate(exc, self.uri(key)) from exc

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except OSError as exc:
            raise _translate(exc, self.uri(key)) from exc

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _translate(exc, self.uri(key)) from exc
        if not stat.S_ISREG(st.st_mode):  # a directory is a prefix, not an object (as on S3)
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def _walk(self, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        # Start at the deepest directory the prefix names, then filter by the full prefix.
        start = os.path.join(self.root, os.path.dirname(prefix))
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root)
            for name in filenames:
                key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    # Renamed into place or deleted since the directory was read; an S3
                    # listing would not show it either, so it is no error.
                    continue
                yield key, st

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        found = [
            ObjectInfo(k, st.st_size, st.st_mtime)
            for k, st in self._walk(prefix)
            if TMP_MARK not in k
        ]
        return iter(sorted(found, key=lambda o: o.key))

    def list_prefixes(self, prefix: str = "") -> list[str]:
        directory = os.path.join(self.root, prefix)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        return sorted(f"{prefix}{n}" for n in names if os.path.isdir(os.path.join(directory, n)))

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            path = self._path(key)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _translate(exc, self.uri(key)) from exc
            self._prune_empty_dirs(os.path.dirname(path))

    def _prune_empty_dirs(self, directory: str) -> None:
        """Remove directories left empty by a delete, up to (not including) the root, so
        deleted checkpoints leave no folders behind."""
        while directory != self.root and directory.startswith(self.root + os.sep):
            try:
                os.rmdir(directory)
            except OSError:  # not empty (or already gone): stop
                return
            directory = os.path.dirname(directory)

    def list_pending_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        for key, st in self._walk(""):
            if TMP_MARK in key:
                directory, name = key.rpartition("/")[0], key.rpartition("/")[2]
                target = name[1 : name.index(TMP_MARK)]
                target_key = f"{directory}/{target}" if directory else target
                if target_key.startswith(prefix):
                    yield PendingUpload(target_key, key, st.st_mtime)

    def abort_upload(self, upload: PendingUpload) -> None:
        self.delete([upload.upload_id])

    def check_conditional_put(self) -> None:
        """Always atomic here: the commit is a ``link(2)``, which fails if the name exists."""

    def close(self) -> None:
        pass


def _create(directory: str, tmp: str) -> BinaryIO:
    """``tmp`` opened for writing, its directory made first. A delete of the directory's last
    object prunes the directory (and empty parents), and may do so at any step: then again.
    ``os.makedirs``' own exists-check races the prune too (``FileExistsError``)."""
    for _ in range(_CREATE_TRIES - 1):
        with contextlib.suppress(FileNotFoundError, FileExistsError):
            os.makedirs(directory, exist_ok=True)
            return open(tmp, "wb")  # noqa: SIM115 - the caller closes it
    os.makedirs(directory, exist_ok=True)  # the last try raises what it meets
    return open(tmp, "wb")  # noqa: SIM115 - the caller closes it


def _translate(exc: OSError, uri: str) -> StoreError:
    if exc.errno == errno.ENOENT:
        return ObjectNotFoundError(f"{uri} does not exist", uri)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AccessDeniedError(f"{uri}: permission denied ({exc.strerror})", uri)
    return StoreError(f"{uri}: {exc.strerror or exc}", uri)
