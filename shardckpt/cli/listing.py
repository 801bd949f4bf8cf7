"""``shardckpt ls`` and ``shardckpt inspect``: what checkpoints there are, and what one holds."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from shardckpt.cli.options import add_checkpoint_arguments, checkpoint_layout, store_for
from shardckpt.cli.output import human_age, human_size
from shardckpt.format.catalog import (
    DISCOVERY_DEPTH,
    CheckpointEntry,
    data_users,
    discover_checkpoints,
)
from shardckpt.format.manifest import Manifest, read_manifest
from shardckpt.store import ObjectStore
from shardckpt.uri import parse_uri


def cmd_ls(args: argparse.Namespace) -> int:
    store = store_for(args, args.uri)
    entries = discover_checkpoints(store, args.depth)
    manifests = {e.prefix: read_manifest(store, e.layout) for e in entries if e.committed}
    users = data_users(entries, manifests)
    rows = [
        _ls_row(store, e, manifests.get(e.prefix), users.get(e.prefix, []))
        for e in entries
        if e.committed or e.dcp or args.all
    ]
    if not rows:
        levels = f"{args.depth} level{'' if args.depth == 1 else 's'}"
        more = f"; ls --all shows {len(entries)} without a manifest" if entries else ""
        where = parse_uri(args.uri)
        if where.scheme == "file" and not os.path.isdir(where.prefix):  # `ls dev/` for s3://dev/
            more += "; no such folder (an S3 URI starts with s3://)"
        print(
            f"shardckpt: no checkpoints under {store.uri()} (looked {levels} deep){more}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'STEP':>10}  {'STATUS':<10}  {'FORMAT':<9}  {'SIZE':>10}  {'OBJECTS':>7}  {'WORLD':>5}  {'AGE':>5}  URI"
    )
    for r in rows:
        step = "-" if r["step"] is None else r["step"]
        note = f"  ({r['note']})" if r["note"] else ""
        print(
            f"{step:>10}  {r['status']:<10}  {r['format']:<9}  {human_size(r['bytes']):>10}  {r['objects']:>7}  {r['world_size']:>5}  {human_age(r['age_s']):>5}  {r['uri']}{note}"
        )
    return 0


def _ls_row(
    store: ObjectStore,
    entry: CheckpointEntry,
    manifest: Manifest | None,
    users: list[CheckpointEntry],
) -> dict[str, Any]:
    """One checkpoint as ``ls`` shows it. A committed one as its manifest describes it: an
    interrupted save's leftovers under the same prefix are not part of it. Any other, what is
    there (DCP's, or a checkpoint without a manifest)."""
    now = time.time()
    if manifest is not None:
        size, count, newest = manifest.total_bytes, len(manifest.objects), manifest.created
    else:
        objects = [o for o in store.list(entry.layout.data_prefix) if entry.holds(o.key)]
        size, count = sum(o.size for o in objects), len(objects)
        newest = max((o.mtime for o in objects), default=now)
    if entry.committed or entry.dcp:
        status, note = "committed", ""
    elif users:  # an incremental base whose manifest retention deleted
        names = ", ".join(f"step-{u.step}" if u.step is not None else u.layout.name for u in users)
        status, note = "retired", f"data used by {names}"
    else:
        status, note = "incomplete", "no manifest: a save in progress, or garbage for gc"
    return {
        "uri": store.uri(entry.prefix),
        "step": entry.step,
        "status": status,
        "format": "dcp" if entry.dcp else "shardckpt",
        "bytes": size,
        "objects": count,
        "world_size": "-" if manifest is None else manifest.world_size,
        "age_s": round(now - newest, 1),
        "note": note,
        "used_by": [store.uri(u.prefix) for u in users],
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    store = store_for(args, args.uri)
    layout = checkpoint_layout(store, args.step)
    manifest = read_manifest(store, layout)
    md = manifest.metadata
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.created))
    print(f"checkpoint {store.uri(layout.prefix)}")
    print(
        f"  format v{manifest.version}, world size {manifest.world_size}, created {created}, {human_size(manifest.total_bytes)} in {len(manifest.objects)} objects"
    )
    if manifest.attributes:
        print(f"  attributes {json.dumps(manifest.attributes)}")
    print(f"{'KEY':<50} {'DTYPE':<10} {'SHAPE':<20} {'CHUNKS':>6}")
    for fqn, item in sorted(md.state_dict_metadata.items()):
        if isinstance(item, TensorStorageMetadata):
            dtype = str(item.properties.dtype).removeprefix("torch.")
            print(f"{fqn:<50} {dtype:<10} {str(list(item.size)):<20} {len(item.chunks):>6}")
        else:
            print(f"{fqn:<50} {'object':<10} {'-':<20} {1:>6}")
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``ls`` and ``inspect`` to the ``shardckpt`` sub-command parser."""
    p = sub.add_parser("ls", parents=[common], help="list checkpoints under a URI")
    p.add_argument(
        "uri", help="a checkpoint, a Checkpointer root, or any prefix or folder above them"
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="also show checkpoints without a manifest: incomplete, or retired incremental "
        "bases whose data newer checkpoints use",
    )
    p.add_argument(
        "--depth",
        type=int,
        choices=range(11),
        default=DISCOVERY_DEPTH,
        metavar="N",
        help=f"look for checkpoints up to N levels of prefixes below URI (default {DISCOVERY_DEPTH})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "inspect", parents=[common], help="show a checkpoint's keys, shapes, dtypes and sharding"
    )
    add_checkpoint_arguments(p)
    p.set_defaults(func=cmd_inspect)
