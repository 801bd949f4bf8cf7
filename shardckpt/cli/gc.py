"""``shardckpt gc``: delete unreferenced data, stale uploads and old checkpoints, under the one
deletion policy of ``shardckpt.retention`` (this module only prints what it did)."""

from __future__ import annotations

import argparse
from typing import Any

from shardckpt._util.duration import duration
from shardckpt.cli.options import store_for
from shardckpt.cli.output import human_size
from shardckpt.retention.garbage import collect_garbage


def cmd_gc(args: argparse.Namespace) -> int:
    store = store_for(args, args.uri)
    report = collect_garbage(
        store, grace_s=args.grace, keep_last=args.keep_last, dry_run=args.dry_run
    )
    verb = "would delete" if args.dry_run else "deleted"
    for uri in report.retired_checkpoints:
        print(f"{verb} checkpoint {uri}")
    for uri in report.garbage_objects:
        print(f"{verb} {uri}")
    for uri in report.aborted_uploads:
        print(f"{'would abort' if args.dry_run else 'aborted'} upload {uri}")
    print(
        f"{verb}: {len(report.retired_checkpoints)} checkpoints, {len(report.garbage_objects)} unreferenced objects "
        f"({human_size(report.garbage_bytes)}), {len(report.aborted_uploads)} unfinished uploads"
    )
    print(
        f"held back as younger than the grace period ({args.grace:g}s): {report.held_back_objects} "
        f"unreferenced objects ({human_size(report.held_back_bytes)}), {report.held_back_uploads} unfinished uploads"
    )
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``gc`` to the ``shardckpt`` sub-command parser."""
    p = sub.add_parser(
        "gc", parents=[common], help="delete unreferenced data, stale uploads, old checkpoints"
    )
    p.add_argument("uri", help="a checkpoint or a Checkpointer root (its steps are collected)")
    p.add_argument("--keep-last", type=int, help="also delete all but the newest N committed steps")
    p.add_argument(
        "--grace",
        type=duration,
        default=3600.0,
        help="leave data younger than this (default 1h: saves in progress)",
    )
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.set_defaults(func=cmd_gc)
