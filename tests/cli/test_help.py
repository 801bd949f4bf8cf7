"""Every argument of every subcommand says what it is for in ``--help``."""

from __future__ import annotations

import argparse

from shardckpt.cli.main import build_parser
from tests.cli.run import shardckpt


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_argument_of_every_subcommand_has_help() -> None:
    """``cp --help`` had none for src, dst, --threads, --overwrite."""
    missing = [
        f"{name} {action.dest}"
        for name, sub in _subcommands(build_parser()).items()
        for action in sub._actions
        if not (action.help or "").strip()
    ]
    assert missing == []


def test_cp_help_describes_its_arguments() -> None:
    done = shardckpt("cp", "--help")
    assert done.code == 0
    for text in ("a checkpoint, or a Checkpointer root", "parallel object copies", "replace"):
        assert text in " ".join(done.out.split()), done.out
