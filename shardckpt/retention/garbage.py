"""Garbage collection: data no manifest references, unfinished uploads, old checkpoints.

What may be deleted is decided by deletion.py (shardckpt's own names only, never what a
committed manifest references); this module decides when: unreferenced data and uploads
once older than the grace period (a save may still be writing them), checkpoints beyond
``keep_last``. Retention deletes manifests before data, and data only once no remaining
manifest references it: a crash at any point leaves every remaining checkpoint loadable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from shardckpt.format.catalog import find_checkpoints
from shardckpt.retention.deletion import referenced_keys, retire_checkpoints, stale_uploads, sweep
from shardckpt.store import ObjectStore

logger = logging.getLogger(__name__)


@dataclass
class GcReport:
    """What a collection removed (or, with ``dry_run``, would remove), and what it held back
    as younger than the grace period (unreferenced objects and their bytes, uploads)."""

    garbage_objects: list[str] = field(default_factory=list)
    garbage_bytes: int = 0
    aborted_uploads: list[str] = field(default_factory=list)
    retired_checkpoints: list[str] = field(default_factory=list)
    held_back_objects: int = 0
    held_back_bytes: int = 0
    held_back_uploads: int = 0


def collect_garbage(
    store: ObjectStore,
    *,
    grace_s: float = 3600.0,
    keep_last: int | None = None,
    dry_run: bool = False,
) -> GcReport:
    """Clean the root of ``store``.

    - In every shardckpt checkpoint: its data objects that no committed manifest references
      (failed or losing attempts; all data of a checkpoint that never committed) and that
      are older than ``grace_s`` seconds. Keys shardckpt's layout does not produce, and DCP
      checkpoints (``.metadata``), are never touched.
    - Unfinished uploads of those keys (or local temporary files) older than ``grace_s``.
    - With ``keep_last``: all but the newest N committed step checkpoints (manifest first).
    """
    report = GcReport()
    cutoff = time.time() - grace_s
    entries = [e for e in find_checkpoints(store) if not e.dcp]
    committed = [e for e in entries if e.committed and e.step is not None]
    retire = committed[:-keep_last] if keep_last else []
    report.retired_checkpoints += [store.uri(e.prefix) for e in retire]
    if retire and not dry_run:
        referenced = retire_checkpoints(store, [e.layout for e in retire])
    else:
        referenced = referenced_keys(store, [e for e in entries if e not in retire])
    for entry in entries:
        if entry in retire:
            continue
        found = sweep(store, entry.layout, referenced, cutoff=cutoff, dry_run=dry_run)
        report.garbage_objects += [store.uri(o.key) for o in found.deleted]
        report.garbage_bytes += sum(o.size for o in found.deleted)
        report.held_back_objects += len(found.held_back)
        report.held_back_bytes += sum(o.size for o in found.held_back)
    aborted, young = stale_uploads(store, cutoff, dry_run=dry_run)
    report.aborted_uploads += [store.uri(u.key) for u in aborted]
    report.held_back_uploads = len(young)
    logger.info(
        "gc %s: %d unreferenced objects (%d bytes), %d uploads, %d checkpoints%s; held back "
        "as younger than %ss: %d objects, %d uploads",
        store.uri(),
        len(report.garbage_objects),
        report.garbage_bytes,
        len(report.aborted_uploads),
        len(report.retired_checkpoints),
        " (dry run)" if dry_run else "",
        grace_s,
        report.held_back_objects,
        report.held_back_uploads,
    )
    return report
