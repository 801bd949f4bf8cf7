"""Finding checkpoints under a root, and deleting them safely.

A root holds either one checkpoint (``manifest.json`` and attempts directly under it) or, as a
:class:`~shardckpt.Checkpointer` writes them, one checkpoint per step (``step-0000000100/``).
Discovery lists manifests only: a checkpoint without one does not exist for loaders.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardckpt.layout import ATTEMPT_MARK, Layout
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
    manifest exists."""

    prefix: str
    step: int | None
    committed: bool

    @property
    def layout(self) -> Layout:
        return Layout(self.prefix)


def step_entries(store: ObjectStore) -> list[CheckpointEntry]:
    """The step checkpoints under the root, oldest first, committed or not."""
    names = [n for n in store.list_prefixes("") if parse_step(n) is not None]
    entries = []
    for name in sorted(names, key=lambda n: parse_step(n) or 0):
        committed = store.head(Layout(name).manifest_key) is not None
        entries.append(CheckpointEntry(name, parse_step(name), committed))
    return entries


def find_checkpoints(store: ObjectStore) -> list[CheckpointEntry]:
    """Every checkpoint under the root: the root itself if it is one, then its steps."""
    entries = []
    root = Layout("")
    if store.head(root.manifest_key) is not None:
        entries.append(CheckpointEntry("", None, True))
    elif any(n.startswith(ATTEMPT_MARK) for n in store.list_prefixes("")):
        entries.append(CheckpointEntry("", None, False))
    return entries + step_entries(store)


def committed_steps(store: ObjectStore) -> list[int]:
    return [e.step for e in step_entries(store) if e.committed and e.step is not None]


def delete_checkpoint(store: ObjectStore, layout: Layout) -> int:
    """Delete one checkpoint: its manifest first (from then on it does not exist), then its
    data, so a crash midway never leaves a manifest pointing at missing data. Returns the
    number of data objects deleted."""
    store.delete([layout.manifest_key])
    keys = [o.key for o in store.list(layout.data_prefix) if o.key != layout.manifest_key]
    store.delete(keys)
    return len(keys)
