"""``shardckpt verify``: re-read every object of a checkpoint and check it against its manifest."""

from __future__ import annotations

import argparse
from typing import Any

from shardckpt.cli.options import add_checkpoint_arguments, checkpoint_layout, store_for
from shardckpt.cli.output import human_size, progress
from shardckpt.tools.verify import verify_checkpoint


def cmd_verify(args: argparse.Namespace) -> int:
    store = store_for(args, args.uri)
    layout = checkpoint_layout(store, args.step)
    # A manifest a load would refuse: one `shardckpt: error:` line naming why (main), exit 1.
    with progress("verify") as on_bytes:
        report = verify_checkpoint(store, layout, num_threads=args.threads, on_bytes=on_bytes)
    for uri, problem in sorted(report.problems.items()):
        print(f"DAMAGED {uri}: {problem}")
    status = "OK" if report.ok else f"{len(report.problems)} of {report.objects} objects damaged"
    print(
        f"{store.uri(layout.prefix)}: {report.objects} objects, {human_size(report.bytes)}: {status}"
    )
    return 0 if report.ok else 1


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``verify`` to the ``shardckpt`` sub-command parser."""
    p = sub.add_parser(
        "verify", parents=[common], help="re-read every object and check sizes and CRC32Cs"
    )
    add_checkpoint_arguments(p)
    p.add_argument("--threads", type=int, default=8, help="parallel reads (default 8)")
    p.set_defaults(func=cmd_verify)
