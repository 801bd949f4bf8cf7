"""What the mirror (``mirror.py``) finds in a local checkpoint directory: its units, and
whether each is complete, i.e. may be uploaded now.

- **DCP directories**: a directory holding ``.metadata``, ``.metadata.tmp`` or ``*.distcp``
  files is one unit (with everything below it). ``FileSystemWriter`` writes ``.metadata``
  last (to a temporary name, renamed into place after every rank's data is written), so the
  unit is complete when ``.metadata`` exists, no ``.metadata.tmp`` does, and ``.metadata`` is
  no older than any other file in it (a re-save in progress rewrites data first). (The
  per-rank ``__<rank>.metadata`` files of ``use_collectives=False`` saves are not a marker.)
- **Other files** (``torch.save``, ``.ckpt``, ...): each file is a unit, complete once
  neither its data nor its inode has changed (``max(mtime, ctime)``) for ``settle_s``
  seconds; a file written under a temporary name and renamed into place counts from the
  rename. A file that changes while it is read (:func:`read_stable`) is left for the next pass.
- Never uploaded: names ending in ``.tmp``, ``.part``, ``.partial``, ``.lock`` or ``~`` (the
  unfinished halves of write-then-rename), and anything that is not a regular file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from shardckpt.format.layout import DCP_MARKER

_DCP_IN_PROGRESS = ".metadata.tmp"
_DCP_DATA_SUFFIX = ".distcp"
_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".lock", "~")


@dataclass
class Unit:
    """One mirrored unit: a DCP directory or a single file. ``name`` is its key ("" for the
    root directory itself), ``files`` maps each key to its local path and stat."""

    name: str
    is_dcp: bool
    files: dict[str, tuple[str, os.stat_result]]
    complete: bool


class FileChanged(Exception):
    """A file changed while it was being read: retry on a later pass."""


def scan(local_dir: str, settle_s: float, now: float) -> tuple[list[Unit], set[str]]:
    """The units under ``local_dir``, and every key present locally (complete or not: a
    file being rewritten keeps its remote copy)."""
    units: list[Unit] = []
    present: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(local_dir):
        dirnames.sort()
        rel = os.path.relpath(dirpath, local_dir)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        if _is_dcp_dir(filenames):
            dirnames[:] = []  # everything below belongs to this unit
            unit = _dcp_unit(dirpath, prefix)
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
            complete = now - max(st.st_mtime, st.st_ctime) >= settle_s
            units.append(Unit(key, False, {key: (os.path.join(dirpath, name), st)}, complete))
    return units, present


def _dcp_unit(directory: str, prefix: str) -> Unit:
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


def _is_dcp_dir(filenames: Iterable[str]) -> bool:
    return any(
        n in (DCP_MARKER, _DCP_IN_PROGRESS) or n.endswith(_DCP_DATA_SUFFIX) for n in filenames
    )


def _ignored(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES) or ".tmp-shardckpt-" in name


def marker_key(unit: Unit) -> str:
    """The key of a DCP unit's ``.metadata`` marker."""
    return f"{unit.name}/{DCP_MARKER}" if unit.name else DCP_MARKER


def _regular_stat(path: str) -> os.stat_result | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st if (st.st_mode & 0o170000) == 0o100000 else None


def read_stable(path: str, st: os.stat_result) -> bytes:
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
        raise FileChanged(path)
    return data
