"""Mirror mode: upload a local checkpoint directory to S3 as training writes it, for code that
keeps saving locally (``torch.save``, DCP's ``FileSystemWriter``, Lightning's default IO).

``Mirror(local_dir, "s3://bucket/run", endpoint=...)`` polls ``local_dir`` every ``interval``
seconds (``start()`` / ``stop()`` or a ``with`` block run it on a background thread;
``sync_once()`` runs one pass) and uploads what is complete, keeping the commit rule of the
rest of shardckpt: a checkpoint never looks complete remotely before all its bytes are there.

What is mirrored, and when it counts as complete:

- **DCP directories**: a directory holding ``.metadata``, ``.metadata.tmp`` or ``*.distcp``
  files is one unit (with everything below it). ``FileSystemWriter`` writes ``.metadata``
  last (to a temporary name, renamed into place after every rank's data is written), so the
  unit is complete when ``.metadata`` exists, no ``.metadata.tmp`` does, and ``.metadata`` is
  no older than any other file in it (a re-save in progress rewrites data first). Nothing of
  an incomplete unit is uploaded; a complete one is uploaded data first and ``.metadata``
  last. When a unit that is already complete remotely changes, its remote ``.metadata`` is
  deleted before the first changed byte is uploaded and put back last. (The per-rank
  ``__<rank>.metadata`` files of ``use_collectives=False`` saves are not a marker.)
- **Other files** (``torch.save``, ``.ckpt``, ...): each file is a unit, complete once
  neither its data nor its inode has changed (``max(mtime, ctime)``) for ``settle_s``
  seconds (default: the interval); a file written under a temporary name and renamed into
  place counts from the rename. An S3 put is atomic, so a reader sees the old object or the
  whole new one. A file that changes while it is read is left for the next pass.
- Never uploaded: names ending in ``.tmp``, ``.part``, ``.partial``, ``.lock`` or ``~`` (the
  unfinished halves of write-then-rename), and anything that is not a regular file.

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

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from shardckpt._util.bytes import crc32c
from shardckpt._util.duration import duration
from shardckpt.errors import InvalidURIError, ShardckptError
from shardckpt.format.layout import DCP_MARKER
from shardckpt.retention.deletion import delete_mirrored
from shardckpt.store import ObjectInfo, ObjectStore, open_store

logger = logging.getLogger(__name__)

_DCP_IN_PROGRESS = ".metadata.tmp"
_DCP_DATA_SUFFIX = ".distcp"
_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".lock", "~")


@dataclass(frozen=True)
class FileState:
    """What was uploaded from one local file: ``size`` in bytes, ``mtime_ns`` (ns since the
    epoch), ``crc32c`` (None when adopted from a remote object after a restart)."""

    size: int
    mtime_ns: int
    crc32c: int | None


@dataclass
class Unit:
    """One mirrored unit: a DCP directory or a single file. ``name`` is its key ("" for the
    root directory itself), ``files`` maps each key to its local path and stat."""

    name: str
    is_dcp: bool
    files: dict[str, tuple[str, os.stat_result]]
    complete: bool


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


class _Changed(Exception):
    """A file changed while it was being read: retry on a later pass."""


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
            units, present = self._scan(time.time())
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
                    if not (unit.is_dcp and _is_marker(unit, key))
                }
                failed = {name for (name, _), job in jobs.items() if not _succeeded(job, report)}
                # Then each DCP unit's marker, only once all its data is there.
                markers = [
                    pool.submit(
                        self._sync_file,
                        unit,
                        _marker_key(unit),
                        *unit.files[_marker_key(unit)],
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

    def _scan(self, now: float) -> tuple[list[Unit], set[str]]:
        """The units under the local directory, and every key present locally (complete or
        not: a file being rewritten keeps its remote copy)."""
        units: list[Unit] = []
        present: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.local_dir):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.local_dir)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            if _is_dcp_dir(filenames):
                dirnames[:] = []  # everything below belongs to this unit
                unit = self._dcp_unit(dirpath, prefix)
                present |= set(unit.files)
                units.append(unit)
                continue
            for name in sorted(filenames):
                if _ignored(name):
                    continue
                st = _regular_stat(os.path.join(dirpath, name))
                if st is None:
                    continue
                key = prefix + name
                present.add(key)
                complete = now - max(st.st_mtime, st.st_ctime) >= self.settle_s
                units.append(Unit(key, False, {key: (os.path.join(dirpath, name), st)}, complete))
        return units, present

    def _dcp_unit(self, directory: str, prefix: str) -> Unit:
        files: dict[str, tuple[str, os.stat_result]] = {}
        in_progress = False
        for dirpath, dirnames, filenames in os.walk(directory):
            dirnames.sort()
            rel = os.path.relpath(dirpath, directory)
            sub = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in filenames:
                if name == _DCP_IN_PROGRESS or name.endswith(f"{DCP_MARKER}.tmp"):
                    in_progress = True
                if _ignored(name):
                    continue
                st = _regular_stat(os.path.join(dirpath, name))
                if st is not None:
                    files[prefix + sub + name] = (os.path.join(dirpath, name), st)
        marker = files.get(prefix + DCP_MARKER)
        complete = (
            marker is not None
            and not in_progress
            and all(st.st_mtime_ns <= marker[1].st_mtime_ns for _, st in files.values())
        )
        return Unit(prefix.rstrip("/"), True, files, complete)

    def _sync_file(
        self, unit: Unit, key: str, path: str, st: os.stat_result, report: SyncReport
    ) -> None:
        """Upload one file unless its bytes are already there. For a DCP unit's data, the
        remote marker is deleted before the first changed byte goes up."""
        record = self._uploaded.get(key)
        marker_key = _marker_key(unit) if unit.is_dcp else None
        forced = key == marker_key and marker_key not in self._remote_keys()
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
        data = _read_stable(path, st)
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
        if marker_key is not None and key != marker_key:
            self._uncommit(marker_key)
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

    def _uncommit(self, marker_key: str) -> None:
        """Delete a DCP unit's remote marker (once) before its data changes."""
        with self._state_lock:
            assert self._remote is not None
            if marker_key not in self._remote:
                return
            # The unit's own marker: the mirror puts it back once the new data is up.
            delete_mirrored(self.store, [marker_key], owned=[marker_key])
            del self._remote[marker_key]
            self._uploaded.pop(marker_key, None)

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


# -- rules ------------------------------------------------------------------------------------
def _is_dcp_dir(filenames: Iterable[str]) -> bool:
    return any(
        n in (DCP_MARKER, _DCP_IN_PROGRESS) or n.endswith(_DCP_DATA_SUFFIX) for n in filenames
    )


def _ignored(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES) or ".tmp-shardckpt-" in name


def _marker_key(unit: Unit) -> str:
    return f"{unit.name}/{DCP_MARKER}" if unit.name else DCP_MARKER


def _is_marker(unit: Unit, key: str) -> bool:
    return key == _marker_key(unit)


def _regular_stat(path: str) -> os.stat_result | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st if (st.st_mode & 0o170000) == 0o100000 else None


def _read_stable(path: str, st: os.stat_result) -> bytes:
    """The file's bytes, if it is still the file ``st`` describes before and after reading."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        data = f.read()
        after = os.fstat(f.fileno())
    same = (before.st_ino, before.st_size, before.st_mtime_ns) == (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )
    if (
        not same
        or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns)
        or len(data) != st.st_size
    ):
        raise _Changed(path)
    return data


def _succeeded(job: Any, report: SyncReport) -> bool:
    try:
        job.result()
        return True
    except (_Changed, FileNotFoundError):
        return False  # changed or vanished under us: a later pass sees the new state
    except Exception as exc:
        report.errors.append(f"{type(exc).__name__}: {exc}")
        return False


# -- command line -----------------------------------------------------------------------------
def add_mirror_command(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add ``mirror LOCAL_DIR URI [--interval 5s] [--once] [--delete]`` to a ``shardckpt``
    sub-command parser. ``parents`` should supply ``--endpoint``/``--region``/``--profile``/
    ``--transport`` (the CLI's common options); without parents they are added here."""
    p = subparsers.add_parser(
        "mirror",
        parents=list(parents),
        help="upload a local checkpoint directory as it changes (complete checkpoints only, markers last)",
    )
    p.add_argument("local_dir", help="the directory training saves to")
    p.add_argument("uri", help="where to mirror it, e.g. s3://bucket/run")
    p.add_argument(
        "--interval", type=duration, default=5.0, help="time between passes (default 5s)"
    )
    p.add_argument(
        "--settle",
        type=duration,
        help="a plain file counts once unchanged this long (default: interval)",
    )
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument(
        "--delete", action="store_true", help="delete remote copies of files deleted locally"
    )
    p.add_argument("--threads", type=int, default=4, help="parallel uploads (default 4)")
    if not parents:
        p.add_argument("--endpoint", help="S3 endpoint URL")
        p.add_argument("--region", help="S3 region")
        p.add_argument("--profile", help="AWS credentials profile")
        p.add_argument(
            "--transport", choices=["boto3", "crt"], help="S3 client for data (default: boto3)"
        )
    p.set_defaults(func=cmd_mirror)
    return p


def cmd_mirror(args: argparse.Namespace) -> int:
    """Run the mirror in the foreground until interrupted (SIGINT/SIGTERM), then run a last
    pass; with ``--once`` run one pass. Prints one line per pass that changed something."""
    options = {k: getattr(args, k, None) for k in ("endpoint", "region", "profile", "transport")}
    mirror = Mirror(
        args.local_dir,
        args.uri,
        interval=args.interval,
        settle_s=args.settle,
        delete=args.delete,
        num_threads=args.threads,
        **{k: v for k, v in options.items() if v},
    )
    try:
        if args.once:
            _print_report(mirror.sync_once(), mirror, always=True)
            return 0
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.is_set():
                try:
                    _print_report(mirror.sync_once(), mirror)
                except ShardckptError as exc:
                    print(f"shardckpt mirror: {exc}", file=sys.stderr)
                stop.wait(args.interval)
        except KeyboardInterrupt:
            pass
        _print_report(mirror.sync_once(), mirror, always=True)
        return 0
    finally:
        mirror.close()


def _print_report(report: SyncReport, mirror: Mirror, *, always: bool = False) -> None:
    if not (always or report.changed):
        return
    stamp = time.strftime("%H:%M:%S")
    for key in report.uploaded:
        print(f"{stamp} uploaded {mirror.store.uri(key)}")
    for key in report.deleted:
        print(f"{stamp} deleted {mirror.store.uri(key)}")
    print(
        f"{stamp} {len(report.uploaded)} uploaded ({report.bytes_uploaded} bytes), {report.unchanged} unchanged, "
        f"{len(report.deleted)} deleted, {len(report.pending)} pending"
    )
