"""Garbage collection: data no manifest references, unfinished uploads, old checkpoints.

Never touches data that a committed manifest references (its own, or a sibling's that an
incremental save reuses), nor anything younger than the grace period (a save may still be
writing it). Retention deletes manifests before data, and data only once no remaining
manifest references it: a crash at any point leaves every remaining checkpoint loadable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from shardckpt.catalog import CheckpointEntry, find_checkpoints
from shardckpt.errors import CheckpointNotFoundError, IncompleteCheckpointError
from shardckpt.layout import Layout
from shardckpt.reader import read_manifest
from shardckpt.store import ObjectStore

logger = logging.getLogger(__name__)


@dataclass
class GcReport:
    """What a collection removed (or, with ``dry_run``, would remove)."""

    garbage_objects: list[str] = field(default_factory=list)
    garbage_bytes: int = 0
    aborted_uploads: list[str] = field(default_factory=list)
    retired_checkpoints: list[str] = field(default_factory=list)


def collect_garbage(
    store: ObjectStore,
    *,
    grace_s: float = 3600.0,
    keep_last: int | None = None,
    dry_run: bool = False,
) -> GcReport:
    """Clean the root of ``store``.

    - In every checkpoint: objects that its manifest does not reference (failed or losing
      attempts; all data of a checkpoint that never committed) and that are older than
      ``grace_s`` seconds.
    - Unfinished multipart uploads (or local temporary files) older than ``grace_s``.
    - With ``keep_last``: all but the newest N committed step checkpoints (manifest first).
    """
    report = GcReport()
    cutoff = time.time() - grace_s
    entries = find_checkpoints(store)
    committed = [e for e in entries if e.committed and e.step is not None]
    retire = committed[:-keep_last] if keep_last else []
    report.retired_checkpoints += [store.uri(e.prefix) for e in retire]
    if retire and not dry_run:
        referenced = retire_checkpoints(store, [e.layout for e in retire])
    else:
        referenced = referenced_keys(store, [e for e in entries if e not in retire])
    for entry in entries:
        if entry not in retire:
            _collect_unreferenced(store, entry, referenced, cutoff, report, dry_run)
    for upload in store.list_pending_uploads(""):
        if upload.started < cutoff:
            report.aborted_uploads.append(store.uri(upload.key))
            if not dry_run:
                store.abort_upload(upload)
    logger.info(
        "gc %s: %d unreferenced objects (%d bytes), %d uploads, %d checkpoints%s",
        store.uri(),
        len(report.garbage_objects),
        report.garbage_bytes,
        len(report.aborted_uploads),
        len(report.retired_checkpoints),
        " (dry run)" if dry_run else "",
    )
    return report


def retire_checkpoints(store: ObjectStore, layouts: list[Layout]) -> set[str]:
    """Delete checkpoints: every manifest first (from then on they do not exist), then their
    data that no remaining checkpoint's manifest references. Returns the keys the remaining
    manifests reference (what a collection after it must keep)."""
    store.delete([layout.manifest_key for layout in layouts])
    keep = referenced_keys(store, find_checkpoints(store))
    garbage = [
        o.key for layout in layouts for o in store.list(layout.data_prefix) if o.key not in keep
    ]
    store.delete(garbage)
    return keep


def referenced_keys(store: ObjectStore, entries: list[CheckpointEntry]) -> set[str]:
    """Every key that the committed manifests among ``entries`` name (themselves included)."""
    keys: set[str] = set()
    for entry in entries:
        if not entry.committed:
            continue
        try:
            manifest = read_manifest(store, entry.layout)
        except (CheckpointNotFoundError, IncompleteCheckpointError):
            continue  # deleted since it was listed: what it referenced no longer matters
        keys.add(entry.layout.manifest_key)
        keys.update(entry.layout.object_keys(manifest.streams))
    return keys


def _collect_unreferenced(
    store: ObjectStore,
    entry: CheckpointEntry,
    referenced: set[str],
    cutoff: float,
    report: GcReport,
    dry_run: bool,
) -> None:
    layout = entry.layout
    # Step checkpoints nested under a root checkpoint are entries of their own.
    nested = layout.prefix == "" and entry.step is None
    garbage = [
        o
        for o in store.list(layout.data_prefix)
        if o.key not in referenced
        and o.mtime < cutoff
        and not (nested and o.key.startswith("step-"))
    ]
    report.garbage_objects += [store.uri(o.key) for o in garbage]
    report.garbage_bytes += sum(o.size for o in garbage)
    if garbage and not dry_run:
        store.delete([o.key for o in garbage])
