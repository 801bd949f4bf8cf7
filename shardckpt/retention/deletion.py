"""Deletion: the one module through which shardckpt deletes anything, and its one policy.

A prefix that holds checkpoints may also hold a user's dataset, another tool's files, a DCP
checkpoint uploaded by ``shardckpt mirror``, or names that merely look like ours, and an
object store has no owners to ask. So shardckpt deletes a key only if

1. its name is one shardckpt's layout produces for its data (``Layout.owns``: a
   checkpoint's ``manifest.json``, a data object ``[<hash>/]attempt-<16 hex>/rank<r>-<seq>``)
   or a temporary file of the local store (``is_temp_key``), and
2. no committed manifest references it (an incremental save reuses its siblings' objects),
3. and the entry point's own condition holds: older than the grace period (gc), beyond
   ``keep_last`` (retention), two generations old (Lightning's overwrite), removed on request.

Two entry points delete what they can tell they wrote themselves instead, since names cannot
tell: the local tier only files this process put there (another job sharing the directory
writes identical names), ``mirror --delete`` only remote keys that mirror uploaded or adopted.
Manifests go before data and DCP ``.metadata`` markers before theirs, so a crash midway never
leaves a commit point naming missing data. The table in docs/reliability.md ("What shardckpt
deletes, and when") lists every entry point with its test.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field

from shardckpt.errors import CheckpointNotFoundError, IncompleteCheckpointError, ManifestError
from shardckpt.format.catalog import CheckpointEntry, find_checkpoints
from shardckpt.format.layout import DCP_MARKER, Layout, is_own_key, is_temp_key
from shardckpt.format.manifest import Manifest, read_manifest
from shardckpt.store.base import ObjectInfo, ObjectStore, PendingUpload

logger = logging.getLogger(__name__)


@dataclass
class Sweep:
    """Unreferenced data of one checkpoint: ``deleted`` (with ``dry_run``: what would be)
    and ``held_back`` (younger than the cutoff: a save may still be writing it)."""

    deleted: list[ObjectInfo] = field(default_factory=list)
    held_back: list[ObjectInfo] = field(default_factory=list)


def manifest_keys(store: ObjectStore, layout: Layout) -> set[str]:
    """The keys the committed manifest at ``layout`` references, itself included (none if
    it is not committed)."""
    try:
        manifest = read_manifest(store, layout)
    except (CheckpointNotFoundError, IncompleteCheckpointError):
        return set()  # absent, or deleted since it was listed: it references nothing
    return {layout.manifest_key, *layout.object_keys(manifest.streams)}


def referenced_keys(store: ObjectStore, entries: list[CheckpointEntry]) -> set[str]:
    """Every key that the committed manifests among ``entries`` name (themselves included)."""
    keys: set[str] = set()
    for entry in entries:
        if entry.committed:
            keys |= manifest_keys(store, entry.layout)
    return keys


def sweep(
    store: ObjectStore,
    layout: Layout,
    keep: Collection[str],
    *,
    cutoff: float = math.inf,
    dry_run: bool = False,
) -> Sweep:
    """Delete the data objects of the checkpoint at ``layout`` that are not in ``keep`` (the
    keys committed manifests reference) and older than ``cutoff`` (seconds since the epoch)."""
    result = Sweep()
    for info in store.list(layout.data_prefix):
        if layout.owns(info.key) and info.key != layout.manifest_key and info.key not in keep:
            (result.deleted if info.mtime < cutoff else result.held_back).append(info)
    if result.deleted and not dry_run:
        store.delete([o.key for o in result.deleted])
    return result


def retire_checkpoints(store: ObjectStore, layouts: list[Layout]) -> set[str]:
    """Delete checkpoints: every manifest first (from then on they do not exist), then their
    data that no remaining checkpoint's manifest references. Returns the keys the remaining
    manifests reference (what a collection after it must keep)."""
    store.delete([layout.manifest_key for layout in layouts])
    keep = referenced_keys(store, find_checkpoints(store))
    for layout in layouts:
        sweep(store, layout, keep)
    return keep


def stale_uploads(
    store: ObjectStore, cutoff: float, *, dry_run: bool = False
) -> tuple[list[PendingUpload], list[PendingUpload]]:
    """Abort the unfinished uploads of our own keys (``is_own_key``: a crashed save may leave
    nothing else, so no checkpoint need be listed; on the local store, our temporary files,
    whose id is their key) started before ``cutoff``. Returns (aborted, held back)."""
    aborted, held_back = [], []
    for upload in store.list_pending_uploads(""):
        if is_temp_key(upload.upload_id) or is_own_key(upload.key):
            (aborted if upload.started < cutoff else held_back).append(upload)
    if not dry_run:
        for upload in aborted:
            store.abort_upload(upload)
    return aborted, held_back


def keys_in_use(store: ObjectStore, layout: Layout) -> set[str] | None:
    """Read before an overwrite of ``layout``: the keys its current manifest references (what
    a reader may be reading), or None if that manifest cannot be parsed (then nothing of the
    checkpoint may be deleted by this overwrite)."""
    try:
        return manifest_keys(store, layout)
    except ManifestError as exc:
        logger.warning("shardckpt: keeping all data of %s: %s", store.uri(layout.prefix), exc)
        return None


def delete_replaced(
    store: ObjectStore, layout: Layout, manifest: Manifest, replaced: set[str] | None
) -> None:
    """After an overwrite of ``layout`` committed ``manifest``: delete the checkpoint's data
    that neither it nor the manifest it replaced (``replaced``, from :func:`keys_in_use`)
    references. A reader that read the replaced manifest can finish; the generation before
    it goes now (and leftovers of failed saves to the same path with it)."""
    if replaced is not None:
        sweep(store, layout, replaced | set(layout.object_keys(manifest.streams)))


def delete_mirrored(store: ObjectStore, keys: Collection[str], owned: Collection[str]) -> list[str]:
    """Delete the remote ``keys`` that the mirror itself put there (``owned``: uploaded or
    adopted), every DCP ``.metadata`` marker before any data, so a mirrored checkpoint never
    looks complete with data missing. Returns the keys deleted (deleting again is harmless)."""
    mine = sorted(k for k in keys if k in owned)
    markers = [k for k in mine if k.rsplit("/", 1)[-1] == DCP_MARKER]
    data = sorted(set(mine) - set(markers))
    for batch in (markers, data):
        if batch:
            store.delete(batch)
    return markers + data
