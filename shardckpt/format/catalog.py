"""Finding checkpoints under a root.

A root holds either one checkpoint (``manifest.json`` and attempts directly under it) or, as a
:class:`~shardckpt.Checkpointer` writes them, one checkpoint per step (``step-0000000100/``).
Discovery lists manifests only: a checkpoint without one does not exist for loaders. A folder
holding DCP's own commit point (``.metadata``, e.g. uploaded by ``shardckpt mirror``) is a
committed checkpoint too, but not shardckpt's: it is listed, and never collected.

gc and retention work on one root and its steps (:func:`find_checkpoints`). ``shardckpt ls``
looks deeper (:func:`discover_checkpoints`), since people point it at a bucket holding
several runs or at a Lightning dirpath of ``*.ckpt`` checkpoints; what it finds there is
only shown, never handed to deletion.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardckpt.format.layout import ATTEMPT_MARK, DCP_MARKER, Layout
from shardckpt.store import ObjectStore

if TYPE_CHECKING:
    from shardckpt.format.manifest import Manifest

STEP_PREFIX = "step-"


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:010d}"


def parse_step(name: str) -> int | None:
    digits = name.removeprefix(STEP_PREFIX)
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint under a root: ``prefix`` is its key prefix ("" for the root itself),
    ``step`` its step (None outside a Checkpointer's layout), ``committed`` whether its
    manifest (shardckpt's commit point) exists, ``dcp`` whether DCP's own ``.metadata``
    commits it instead (a checkpoint shardckpt did not write: listed, never collected)."""

    prefix: str
    step: int | None
    committed: bool
    dcp: bool = False

    @property
    def layout(self) -> Layout:
        return Layout(self.prefix)

    def holds(self, key: str) -> bool:
        """Whether ``key`` is part of this checkpoint: shardckpt's own names (a user's files
        beside them are not), or for DCP every key under it (but nested steps)."""
        if not self.dcp:
            return self.layout.owns(key)
        nested = self.prefix == "" and parse_step(key.split("/", 1)[0]) is not None
        return key.startswith(self.layout.data_prefix) and not nested


def _entry(store: ObjectStore, prefix: str, step: int | None) -> CheckpointEntry | None:
    """The checkpoint at ``prefix`` if it has a commit point (ours, else DCP's), else None."""
    layout = Layout(prefix)
    if store.head(layout.manifest_key) is not None:
        return CheckpointEntry(prefix, step, True)
    if store.head(layout.key(DCP_MARKER)) is not None:
        return CheckpointEntry(prefix, step, False, dcp=True)
    return None


def _name(prefix: str) -> str:
    return prefix.rsplit("/", 1)[-1]


def _steps(store: ObjectStore, children: list[str]) -> list[CheckpointEntry]:
    """The step checkpoints among ``children`` (prefixes), oldest first, committed or not."""
    steps = [(step, c) for c in children if (step := parse_step(_name(c))) is not None]
    return [_entry(store, c, step) or CheckpointEntry(c, step, False) for step, c in sorted(steps)]


def _checkpoints_at(store: ObjectStore, prefix: str) -> tuple[list[CheckpointEntry], list[str]]:
    """The checkpoint at ``prefix`` if there is one (committed, or attempts without a
    manifest), then its steps; and the prefixes directly below it."""
    root = _entry(store, prefix, None)
    children = store.list_prefixes(Layout(prefix).data_prefix)
    if root is None and any(_name(c).startswith(ATTEMPT_MARK) for c in children):
        root = CheckpointEntry(prefix, None, False)
    return ([root] if root else []) + _steps(store, children), children


def step_entries(store: ObjectStore) -> list[CheckpointEntry]:
    """The step checkpoints under the root, oldest first, committed or not."""
    return _steps(store, store.list_prefixes(""))


def find_checkpoints(store: ObjectStore) -> list[CheckpointEntry]:
    """Every checkpoint under the root: the root itself if it is one, then its steps."""
    return _checkpoints_at(store, "")[0]


DISCOVERY_DEPTH = 3  # bucket / project / run / checkpoint, or dirpath / *.ckpt


def discover_checkpoints(store: ObjectStore, depth: int = DISCOVERY_DEPTH) -> list[CheckpointEntry]:
    """Every checkpoint at the root or up to ``depth`` levels of prefixes below it, committed
    or not, in key order (steps by step). Per prefix looked at: one LIST with a delimiter and
    a HEAD or two; below a checkpoint only its steps are looked at, so its data (attempts,
    hashed prefixes) is never listed. For ``ls`` only: deletion uses :func:`find_checkpoints`."""
    return list(_discover(store, "", depth))


def _discover(store: ObjectStore, prefix: str, depth: int) -> Iterator[CheckpointEntry]:
    found, children = _checkpoints_at(store, prefix)
    yield from found
    if depth == 0 or (found and found[0].prefix == prefix):
        return  # the rest below a checkpoint is its data
    for child in children:
        if parse_step(_name(child)) is None and not _name(child).startswith(ATTEMPT_MARK):
            yield from _discover(store, child, depth - 1)


def data_users(
    entries: list[CheckpointEntry], manifests: Mapping[str, Manifest]
) -> dict[str, list[CheckpointEntry]]:
    """For each checkpoint among ``entries`` without a manifest, the committed ones (whose
    ``manifests`` are given by prefix) that reuse its data. Such a checkpoint is an
    incremental base that retention retired (its manifest deleted, its data kept while a
    newer manifest references it): not an incomplete save, and its data is not garbage."""
    uncommitted = [e for e in entries if not (e.committed or e.dcp)]
    users: dict[str, list[CheckpointEntry]] = {}
    for user in entries:
        if not (user.prefix and user.prefix in manifests):
            continue  # homes are siblings: a checkpoint at the root has none in this store
        keys = user.layout.object_keys(s for s in manifests[user.prefix].streams if s.home)
        for base in uncommitted:
            if any(base.holds(k) for k in keys):
                users.setdefault(base.prefix, []).append(user)
    return users


def committed_steps(store: ObjectStore) -> list[int]:
    return [e.step for e in step_entries(store) if e.committed and e.step is not None]
