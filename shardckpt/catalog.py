"""Finding checkpoints under a root, and deleting them safely.

A root holds either one checkpoint (``manifest.json`` and attempts directly under it) or, as a
:class:`~shardckpt.Checkpointer` writes them, one checkpoint per step (``step-0000000100/``).
Discovery lists manifests only: a checkpoint without one does not exist for loaders. A folder
holding DCP's own commit point (``.metadata``, e.g. uploaded by ``shardckpt mirror``) is a
committed checkpoint too, but not shardckpt's: it is listed, and never collected.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardckpt.layout import ATTEMPT_MARK, DCP_MARKER, Layout
from shardckpt.store import ObjectStore

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


def step_entries(store: ObjectStore) -> list[CheckpointEntry]:
    """The step checkpoints under the root, oldest first, committed or not."""
    names = [n for n in store.list_prefixes("") if parse_step(n) is not None]
    entries = []
    for name in sorted(names, key=lambda n: parse_step(n) or 0):
        step = parse_step(name)
        entries.append(_entry(store, name, step) or CheckpointEntry(name, step, False))
    return entries


def find_checkpoints(store: ObjectStore) -> list[CheckpointEntry]:
    """Every checkpoint under the root: the root itself if it is one, then its steps."""
    root = _entry(store, "", None)
    if root is None and any(n.startswith(ATTEMPT_MARK) for n in store.list_prefixes("")):
        root = CheckpointEntry("", None, False)
    return ([root] if root else []) + step_entries(store)


def committed_steps(store: ObjectStore) -> list[int]:
    return [e.step for e in step_entries(store) if e.committed and e.step is not None]
