"""What every ``shardckpt`` command shares: the common options (endpoint, region, profile,
transport, timeout), turning them into store options (written once: ``mirror`` and
``bench`` pass them to the library as the other commands do), and picking the checkpoint a
command works on."""

from __future__ import annotations

import argparse
from typing import Any

from shardckpt._util.duration import duration
from shardckpt.errors import CheckpointNotFoundError
from shardckpt.format.catalog import committed_steps, step_name
from shardckpt.format.layout import Layout
from shardckpt.format.manifest import read_manifest
from shardckpt.store import ObjectStore, open_store
from shardckpt.store.s3_config import timeout_options

# The options of open_store that the common arguments set, when given.
STORE_OPTIONS = ("endpoint", "region", "profile", "transport")


def common_parser() -> argparse.ArgumentParser:
    """A parent parser with the options every command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS)"
    )
    common.add_argument(
        "--region", help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION / us-east-1)"
    )
    common.add_argument("--profile", help="AWS credentials profile")
    common.add_argument(
        "--transport", choices=["boto3", "crt"], help="S3 client for data (default: boto3)"
    )
    common.add_argument(
        "--timeout",
        type=duration,
        default=30.0,
        help="give up on an S3 request after this long, retries included (default 30s)",
    )
    return common


def store_options(args: argparse.Namespace) -> dict[str, Any]:
    """The store options of the common arguments."""
    options = {k: getattr(args, k) for k in STORE_OPTIONS if getattr(args, k)}
    return {**options, **timeout_options(args.timeout)}


def store_for(args: argparse.Namespace, uri: str) -> ObjectStore:
    """The store at ``uri``, opened with the common arguments."""
    return open_store(uri, **store_options(args))


def checkpoint_layout(store: ObjectStore, step: int | None) -> Layout:
    """The checkpoint a command works on: the URI itself, or one of its steps (latest by default)."""
    if step is None and store.head(Layout().manifest_key) is not None:
        return Layout()
    steps = committed_steps(store)
    if step is None:
        if not steps:
            read_manifest(store, Layout())  # raises the precise error: not found or incomplete
            raise CheckpointNotFoundError(f"no committed checkpoint at {store.uri()}")
        step = steps[-1]
    elif step not in steps:
        raise CheckpointNotFoundError(
            f"no committed checkpoint for step {step} under {store.uri()}"
        )
    return Layout(step_name(step))


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """``URI [--step N]``: a checkpoint, or one step of a Checkpointer root."""
    p.add_argument("uri", help="a checkpoint, or a Checkpointer root (latest step by default)")
    p.add_argument("--step", type=int, help="which step under a Checkpointer root")
