"""A durable store with a fast local copy of data objects (the Checkpointer's tiered option).

Data objects are written to both; manifests, listings and deletes go to the durable store,
which alone decides what exists. Reads of data come from the local copy when it has the
object, else from the durable store; the reader checks every byte's CRC32C either way. So a
job restarted on the same node reads its own shards from local disk, while a job on another
node (or with another world size) reads whatever it lacks from S3.

The local directory may be shared (another job's checkpoints, a dataset), and names cannot
tell whose a file is, so only files this process put there are ever deleted from it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterator, Sequence

from shardckpt.errors import StoreError
from shardckpt.store.base import Buffer, ObjectInfo, ObjectStore, PendingUpload
from shardckpt.store.local import LocalStore

logger = logging.getLogger(__name__)


class TieredStore:
    """``durable`` (e.g. S3) plus ``fast`` (a local directory)."""

    def __init__(self, durable: ObjectStore, fast: LocalStore) -> None:
        self.durable = durable
        self.fast = fast
        self.stats = durable.stats
        self._written: set[str] = set()  # keys this process put into ``fast``
        self._lock = threading.Lock()

    def uri(self, key: str = "") -> str:
        return self.durable.uri(key)

    def put(
        self,
        key: str,
        data: Sequence[Buffer],
        *,
        if_absent: bool = False,
        crc32c: int | None = None,
    ) -> None:
        self.durable.put(key, data, if_absent=if_absent, crc32c=crc32c)
        if if_absent:  # a commit point: only the durable store's copy counts
            return
        try:
            self.fast.put(key, data)
            with self._lock:
                self._written.add(key)
        except StoreError as exc:  # the local copy is an optimization; S3 has the data
            logger.warning("shardckpt: could not keep a local copy of %s: %s", key, exc)

    def get_into(self, key: str, offset: int, views: Sequence[memoryview]) -> None:
        info = self.fast.head(key)
        if info is not None and info.size >= offset + sum(len(v) for v in views):
            self.fast.get_into(key, offset, views)
        else:
            self.durable.get_into(key, offset, views)

    def get(self, key: str) -> bytes:
        return self.durable.get(key)

    def head(self, key: str) -> ObjectInfo | None:
        return self.durable.head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.durable.list(prefix)

    def list_prefixes(self, prefix: str = "") -> list[str]:
        return self.durable.list_prefixes(prefix)

    def delete(self, keys: Sequence[str]) -> None:
        self.durable.delete(keys)
        with self._lock:
            self._delete_local_copies(keys)

    def keep_only(self, prefix: str) -> None:
        """Drop the local copies this process made outside ``prefix`` (the newest checkpoint)."""
        with self._lock:
            outside = [k for k in self._written if not k.startswith(prefix)]
            self._delete_local_copies(outside)

    def _delete_local_copies(self, keys: Collection[str]) -> None:
        # Only copies this process put there: another job's files in the same directory
        # are never in _written, whatever their names.
        own = sorted(self._written.intersection(keys))
        self.fast.delete(own)
        self._written.difference_update(own)

    def list_pending_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        return self.durable.list_pending_uploads(prefix)

    def abort_upload(self, upload: PendingUpload) -> None:
        self.durable.abort_upload(upload)

    def check_conditional_put(self) -> None:
        self.durable.check_conditional_put()  # commits go to the durable store alone

    def close(self) -> None:
        self.durable.close()
        self.fast.close()
