"""Mirror mode: upload a local checkpoint directory to S3 as training writes it, for code that
keeps saving locally (``torch.save``, DCP's ``FileSystemWriter``, Lightning's default IO).

``Mirror(local_dir, "s3://bucket/run", endpoint=...)`` polls ``local_dir`` every ``interval``
seconds (``start()`` / ``stop()`` or a ``with`` block run it on a background thread;
``sync_once()`` runs one pass) and uploads what is complete, keeping the commit rule of the
rest of shardckpt: a checkpoint never looks complete remotely before all its bytes are there.

What is mirrored, and when a unit (a DCP directory, or a single file) counts as complete:
``mirror_scan.py``. Nothing of an incomplete unit is uploaded; a complete DCP unit is
uploaded data first and ``.metadata`` last. When a unit that is already complete remotely
changes, its remote ``.metadata`` is deleted before the first changed byte is uploaded and
put back last. A plain file's ``settle_s`` defaults to the interval. An S3 put is atomic, so
a reader sees the old object or the whole new one.

Unchanged files are never uploaded again: each uploaded file's size, mtime and CRC32C are
kept; a file whose size and mtime are unchanged is skipped without being read, one whose
mtime changed but whose bytes did not (same size and CRC32C) is not re-uploaded either. After
a restart, a remote object of the same size that is not older than the local file (to the
second) counts as uploaded (the mirror assumes it is the only writer of its remote prefix).
With ``delete`` (default off) remote objects whose local file is gone are deleted, each
``.metadata`` before the data it describes; only objects this mirror uploaded or adopted,
never others found under the remote prefix (deletion.py). Files are read whole into memory
to upload them: memory is bounded by ``num_threads`` times the largest file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from shardckpt._util.bytes import crc32c
from shardckpt.errors import InvalidURIError, ShardckptError
from shardckpt.retention.deletion import delete_mirrored
from shardckpt.store import ObjectInfo, ObjectStore, open_store
from shardckpt.tools.mirror_scan import FileChanged, Unit, marker_key, read_stable, scan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileState:
    """What was uploaded from one local file: ``size`` in bytes, ``mtime_ns`` (ns since the
    epoch), ``crc32c`` (None when adopted from a remote object after a restart)."""

    size: int
    mtime_ns: int
    crc32c: int | None


@dataclass
class SyncReport:
    """What one pass did: keys uploaded, bytes uploaded, files found unchanged, units not
    complete yet (left for a later pass), keys deleted remotely, and errors (one line each)."""

    uploaded: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    unchanged: int = 0
    pending: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.uploaded or self.deleted or self.errors)


class Mirror:
    """Mirror ``local_dir`` to ``remote`` (a URI, or an open :class:`ObjectStore`).

    - ``interval``: seconds between passes of the background thread (default 5).
    - ``settle_s``: seconds a plain file must stay unchanged to count as complete (default:
      ``interval``).
    - ``delete``: delete remote copies of files deleted locally (default False).
    - ``num_threads``: parallel uploads (default 4).
    - Other options go to the store (``endpoint``, ``region``, ``profile``, ``transport``).
    """

    def __init__(
        self,
        local_dir: str | os.PathLike[str],
        remote: str | os.PathLike[str] | ObjectStore,
        *,
        interval: float = 5.0,
        settle_s: float | None = None,
        delete: bool = False,
        num_threads: int = 4,
        **store_options: Any,
    ) -> None:
        self.local_dir = os.path.abspath(os.fspath(local_dir))
        if not os.path.isdir(self.local_dir):
            raise InvalidURIError(f"mirror source {self.local_dir} is not a directory")
        if interval <= 0 or num_threads < 1:
            raise ValueError(
                f"interval must be > 0 and num_threads >= 1, got {interval}, {num_threads}"
            )
        if isinstance(remote, ObjectStore):
            if store_options:
                raise TypeError("store options go with a URI, not with an open store")
            self.store, self._owns_store = remote, False
        else:
            self.store, self._owns_store = open_store(remote, **store_options), True
        self.interval = interval
        self.settle_s = interval if settle_s is None else settle_s
        self.delete = delete
        self.num_threads = num_threads
        self.last_report: SyncReport | None = None
        self.last_error: BaseException | None = None
        self._uploaded: dict[str, FileState] = {}
        self._remote: dict[str, ObjectInfo] | None = None  # keys believed to exist remotely
        self._pass_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread (a pass every ``interval`` seconds)."""
        if self._thread is not None:
            raise RuntimeError("this Mirror is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="shardckpt-mirror", daemon=True)
        self._thread.start()

    def stop(self, *, drain_s: float = 0.0) -> SyncReport:
        """Stop the background thread, then run final passes until nothing is pending or
        ``drain_s`` seconds have passed (0: one final pass). Returns the last pass's report;
        raises its error, if it failed."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        deadline = time.monotonic() + drain_s
        while True:
            report = self.sync_once()
            if not report.pending or time.monotonic() >= deadline:
                return report
            time.sleep(
                min(self.interval, max(0.0, deadline - time.monotonic()), self.settle_s / 2 or 0.05)
            )

    def close(self) -> None:
        """Stop without a final pass and release the store."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Mirror:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            # Files written just before the block ended need settle_s to count as complete.
            self.stop(drain_s=self.settle_s + 2 * self.interval)
        finally:
            self.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
                self.last_error = None
            except Exception as exc:  # kept for stop()/callers; the next pass retries
                self.last_error = exc
                logger.warning("mirror %s -> %s: %s", self.local_dir, self.store.uri(), exc)
            self._stop.wait(self.interval)

    # -- one pass -----------------------------------------------------------------------------
    def sync_once(self) -> SyncReport:
        """Upload what is complete and changed; with ``delete``, delete what is gone. Raises
        :class:`ShardckptError` naming the first failure if any upload or delete failed (the
        others still ran; ``last_report`` has them all)."""
        with self._pass_lock:
            report = SyncReport()
            if self._remote is None:
                self._remote = {o.key: o for o in self.store.list("")}
            units, present = scan(self.local_dir, self.settle_s, time.time())
            ready = [u for u in units if u.complete]
            report.pending = [u.name or "." for u in units if not u.complete]
            with ThreadPoolExecutor(
                self.num_threads, thread_name_prefix="shardckpt-mirror"
            ) as pool:
                # Data first: plain files and every DCP unit's files but its marker, together.
                jobs = {
                    (unit.name, key): pool.submit(self._sync_file, unit, key, path, st, report)
                    for unit in ready
                    for key, (path, st) in unit.files.items()
                    if not (unit.is_dcp and key == marker_key(unit))
                }
                failed = {name for (name, _), job in jobs.items() if not _succeeded(job, report)}
                # Then each DCP unit's marker, only once all its data is there.
                markers = [
                    pool.submit(
                        self._sync_file,
                        unit,
                        marker_key(unit),
                        *unit.files[marker_key(unit)],
                        report,
                    )
                    for unit in ready
                    if unit.is_dcp and unit.name not in failed
                ]
                for job in markers:
                    _succeeded(job, report)
            if self.delete:
                self._delete_gone(present, report)
            self.last_report = report
        if report.uploaded or report.deleted:
            logger.info(
                "mirror %s -> %s: uploaded %d objects (%d bytes), deleted %d, %d pending",
                self.local_dir, self.store.uri(), len(report.uploaded), report.bytes_uploaded,
                len(report.deleted), len(report.pending),
            )  # fmt: skip
        if report.errors:
            raise ShardckptError(
                f"mirror {self.local_dir} -> {self.store.uri()}: {len(report.errors)} failures; "
                f"first: {report.errors[0]}"
            )
        return report

    def _sync_file(
        self, unit: Unit, key: str, path: str, st: os.stat_result, report: SyncReport
    ) -> None:
        """Upload one file unless its bytes are already there. For a DCP unit's data, the
        remote marker is deleted before the first changed byte goes up."""
        record = self._uploaded.get(key)
        marker = marker_key(unit) if unit.is_dcp else None
        forced = key == marker and marker not in self._remote_keys()
        if (
            not forced
            and record is not None
            and (record.size, record.mtime_ns) == (st.st_size, st.st_mtime_ns)
        ):
            self._count_unchanged(report)
            return
        if not forced and record is None and self._adopt(key, st):
            self._count_unchanged(report)
            return
        data = read_stable(path, st)
        checksum = crc32c(memoryview(data))
        if (
            not forced
            and record is not None
            and (record.size, record.crc32c) == (len(data), checksum)
        ):
            with self._state_lock:
                self._uploaded[key] = FileState(len(data), st.st_mtime_ns, checksum)
            self._count_unchanged(report)
            return
        if marker is not None and key != marker:
            self._uncommit(marker)
        self.store.put(key, [data])
        with self._state_lock:
            self._uploaded[key] = FileState(len(data), st.st_mtime_ns, checksum)
            assert self._remote is not None
            self._remote[key] = ObjectInfo(key, len(data), time.time())
            report.uploaded.append(key)
            report.bytes_uploaded += len(data)

    def _adopt(self, key: str, st: os.stat_result) -> bool:
        """After a restart: count a remote object of the same size, not older than the local
        file, as this file's upload."""
        with self._state_lock:
            assert self._remote is not None
            remote = self._remote.get(key)
            # S3 times are whole seconds: compare at that precision.
            if remote is None or remote.size != st.st_size or remote.mtime < int(st.st_mtime):
                return False
            self._uploaded[key] = FileState(st.st_size, st.st_mtime_ns, None)
            return True

    def _uncommit(self, marker: str) -> None:
        """Delete a DCP unit's remote marker (once) before its data changes."""
        with self._state_lock:
            assert self._remote is not None
            if marker not in self._remote:
                return
            # The unit's own marker: the mirror puts it back once the new data is up.
            delete_mirrored(self.store, [marker], owned=[marker])
            del self._remote[marker]
            self._uploaded.pop(marker, None)

    def _remote_keys(self) -> set[str]:
        with self._state_lock:
            assert self._remote is not None
            return set(self._remote)

    def _count_unchanged(self, report: SyncReport) -> None:
        with self._state_lock:
            report.unchanged += 1

    def _delete_gone(self, present: set[str], report: SyncReport) -> None:
        """Delete remote copies of files gone locally: only those this mirror uploaded or
        adopted (``_uploaded``), never other objects under the remote prefix."""
        with self._state_lock:
            owned = set(self._uploaded)
        try:
            deleted = delete_mirrored(self.store, owned - present, owned)
        except Exception as exc:  # the next pass deletes them again
            report.errors.append(f"{type(exc).__name__}: {exc}")
            return
        with self._state_lock:
            for key in deleted:
                assert self._remote is not None
                self._remote.pop(key, None)
                self._uploaded.pop(key, None)
        report.deleted += deleted


def _succeeded(job: Any, report: SyncReport) -> bool:
    try:
        job.result()
        return True
    except (FileChanged, FileNotFoundError):
        return False  # changed or vanished under us: a later pass sees the new state
    except Exception as exc:
        report.errors.append(f"{type(exc).__name__}: {exc}")
        return False
