"""Garbage collection: data no manifest references, unfinished uploads, old checkpoints.

Never touches a committed checkpoint's referenced data, nor anything younger than the grace
period (a save may still be writing it). Retention deletes manifests before data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from shardckpt.catalog import CheckpointEntry, delete_checkpoint, find_checkpoints
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
    for entry in retire:
        report.retired_checkpoints.append(store.uri(entry.prefix))
        if not dry_run:
            delete_checkpoint(store, entry.layout)
    for entry in entries:
        if entry not in retire:
            _collect_unreferenced(store, entry, cutoff, report, dry_run)
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


def _collect_unreferenced(
    store: ObjectStore, entry: CheckpointEntry, cutoff: float, report: GcReport, dry_run: bool
) -> None:
    layout = entry.layout
    referenced = {layout.manifest_key}
    if entry.committed:
        referenced |= {layout.resolve(o.key) for o in read_manifest(store, layout).objects}
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
