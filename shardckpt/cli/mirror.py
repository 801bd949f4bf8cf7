"""``shardckpt mirror``: run :class:`shardckpt.tools.mirror.Mirror` in the foreground and print
what each pass did."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from shardckpt._util.duration import duration
from shardckpt.cli.options import common_parser, store_options
from shardckpt.errors import ShardckptError
from shardckpt.tools.mirror import Mirror, SyncReport


def add_mirror_command(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add ``mirror LOCAL_DIR URI [--interval 5s] [--once] [--delete]`` to a ``shardckpt``
    sub-command parser. ``parents`` should supply the CLI's common options
    (:func:`~shardckpt.cli.options.common_parser`); without parents they are added here."""
    p = subparsers.add_parser(
        "mirror",
        parents=list(parents) or [common_parser()],
        help="upload a local checkpoint directory as it changes (complete checkpoints only, markers last)",
    )
    p.add_argument("local_dir", help="the directory training saves to")
    p.add_argument("uri", help="where to mirror it, e.g. s3://bucket/run")
    p.add_argument(
        "--interval", type=duration, default=5.0, help="time between passes (default 5s)"
    )
    p.add_argument(
        "--settle",
        type=duration,
        help="a plain file counts once unchanged this long (default: interval)",
    )
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument(
        "--delete", action="store_true", help="delete remote copies of files deleted locally"
    )
    p.add_argument("--threads", type=int, default=4, help="parallel uploads (default 4)")
    p.set_defaults(func=cmd_mirror)
    return p


def cmd_mirror(args: argparse.Namespace) -> int:
    """Run the mirror in the foreground until interrupted (SIGINT/SIGTERM), then run a last
    pass; with ``--once`` run one pass. Prints one line per pass that changed something."""
    mirror = Mirror(
        args.local_dir,
        args.uri,
        interval=args.interval,
        settle_s=args.settle,
        delete=args.delete,
        num_threads=args.threads,
        **store_options(args),
    )
    try:
        if args.once:
            _print_report(mirror.sync_once(), mirror, always=True)
            return 0
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.is_set():
                try:
                    _print_report(mirror.sync_once(), mirror)
                except ShardckptError as exc:
                    print(f"shardckpt mirror: {exc}", file=sys.stderr)
                stop.wait(args.interval)
        except KeyboardInterrupt:
            pass
        _print_report(mirror.sync_once(), mirror, always=True)
        return 0
    finally:
        mirror.close()


def _print_report(report: SyncReport, mirror: Mirror, *, always: bool = False) -> None:
    if not (always or report.changed):
        return
    stamp = time.strftime("%H:%M:%S")
    for key in report.uploaded:
        print(f"{stamp} uploaded {mirror.store.uri(key)}")
    for key in report.deleted:
        print(f"{stamp} deleted {mirror.store.uri(key)}")
    print(
        f"{stamp} {len(report.uploaded)} uploaded ({report.bytes_uploaded} bytes), {report.unchanged} unchanged, "
        f"{len(report.deleted)} deleted, {len(report.pending)} pending"
    )
