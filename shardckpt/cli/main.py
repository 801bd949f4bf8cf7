"""The ``shardckpt`` command: list, inspect, verify, clean up, export, copy, mirror and
benchmark checkpoints.

Exit codes: 0 success; 1 a failure (one line, ``shardckpt: error: ...``, naming the URI and
cause), or ``verify`` found damage; 2 bad usage; 130 interrupted (Ctrl-C). An S3 request
that goes unanswered is given up after ``--timeout`` (30 s), retries included, not after
the library's 5 minutes.
"""

from __future__ import annotations

import argparse
import logging
import sys

from shardckpt.cli import bench, copy, gc, listing, verify
from shardckpt.cli.mirror import add_mirror_command
from shardckpt.cli.options import common_parser
from shardckpt.errors import ShardckptError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = common_parser()
    sub = parser.add_subparsers(dest="command", required=True)
    listing.add_commands(sub, common)  # ls, inspect
    verify.add_commands(sub, common)
    gc.add_commands(sub, common)
    copy.add_commands(sub, common)  # export, cp
    add_mirror_command(sub, parents=[common])
    bench.add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The library's WARNINGs (a request being retried, ...) are for the person waiting.
    shown = logging.StreamHandler(sys.stderr)
    shown.setFormatter(logging.Formatter("shardckpt: warning: %(message)s"))
    shown.setLevel(logging.WARNING)
    library = logging.getLogger("shardckpt")
    library.addHandler(shown)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ShardckptError as exc:
        print(f"shardckpt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shardckpt: interrupted", file=sys.stderr)
        return 130
    finally:
        library.removeHandler(shown)


if __name__ == "__main__":
    sys.exit(main())
