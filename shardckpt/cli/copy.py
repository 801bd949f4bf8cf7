"""``shardckpt export`` and ``shardckpt cp``: a checkpoint out of its store, into one file or
into another store (data first, checked against the manifest; the manifest last)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from shardckpt._util.bytes import crc32c
from shardckpt._util.tree import tensor_leaves
from shardckpt.cli.options import (
    add_checkpoint_arguments,
    checkpoint_layout,
    store_for,
    store_options,
)
from shardckpt.cli.output import human_size, progress
from shardckpt.errors import ChecksumMismatchError, ObjectExistsError, ShardckptError
from shardckpt.format.catalog import find_checkpoints
from shardckpt.format.layout import Layout
from shardckpt.format.manifest import ObjectRecord, fetch_manifest, read_manifest
from shardckpt.store import ObjectStore
from shardckpt.store.base import gather
from shardckpt.tools.single import load as load_single


def _output_file(path: str) -> str:
    """An argparse type for a file to create, checked before anything is downloaded. It
    raises our error, not ``ArgumentTypeError``: argparse lets it through to ``main``, which
    prints it as one line (a missing folder is a failure, not a usage error)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ShardckptError(f"cannot write {path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ShardckptError(f"cannot write {path}: the directory {folder} is not writable")
    return path


def cmd_export(args: argparse.Namespace) -> int:
    store = store_for(args, args.uri)
    layout = checkpoint_layout(store, args.step)
    uri = store.uri(layout.prefix)
    with progress("export") as on_bytes:
        state = load_single(uri, trusted=args.trusted, on_bytes=on_bytes, **store_options(args))
    if args.out.endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ShardckptError(
                "writing .safetensors needs the safetensors package: pip install safetensors"
            ) from None
        # safetensors holds tensors only, by flat name; other values have no place there
        flat = {".".join(map(str, path)): t for path, t in tensor_leaves(state).items()}
        save_file({k: v.contiguous() for k, v in flat.items()}, args.out)
        print(f"wrote {len(flat)} tensors to {args.out}")
    else:
        torch.save(state, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    src, dst = store_for(args, args.src), store_for(args, args.dst)
    entries = [e for e in find_checkpoints(src) if e.committed]
    if not entries:
        read_manifest(src, Layout())  # the precise error
    for entry in entries:
        layout = entry.layout
        manifest_key = layout.manifest_key
        # One fetch: the manifest copied is the one whose checksums the data is checked against.
        manifest_bytes, manifest = fetch_manifest(src, layout)
        keys = layout.object_keys(manifest.streams)  # reused streams: their homes' keys
        with (
            progress(f"cp {layout.name}".strip()) as on_bytes,
            ThreadPoolExecutor(args.threads) as pool,
        ):
            total, objects = manifest.total_bytes, zip(keys, manifest.objects, strict=True)
            gather([pool.submit(_copy_object, src, dst, k, o, on_bytes, total) for k, o in objects])
        try:  # the manifest last: the copy exists only once all its data does
            dst.put(manifest_key, [manifest_bytes], if_absent=not args.overwrite)
        except ObjectExistsError:
            raise ShardckptError(
                f"{dst.uri(manifest_key)} already exists; pass --overwrite to replace it"
            ) from None
        print(
            f"copied {src.uri(layout.prefix)} -> {dst.uri(layout.prefix)} ({human_size(manifest.total_bytes)})"
        )
    return 0


def _copy_object(
    src: ObjectStore,
    dst: ObjectStore,
    key: str,
    obj: ObjectRecord,
    on_bytes: Callable[[int, int], None],
    total: int,
) -> None:
    """Copy one object of a checkpoint, checked against its manifest record first."""
    data = src.get(key)
    checksum = crc32c(memoryview(data))
    if (len(data), checksum) != (obj.size, obj.crc32c):
        raise ChecksumMismatchError(
            f"{src.uri(key)} does not match its manifest ({len(data)} bytes, CRC32C "
            f"{checksum:#010x}; manifest: {obj.size} bytes, "
            f"{obj.crc32c:#010x}): not copied; this checkpoint's manifest is not written"
        )
    dst.put(key, [data])
    on_bytes(len(data), total)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``export`` and ``cp`` to the ``shardckpt`` sub-command parser."""
    p = sub.add_parser(
        "export",
        parents=[common],
        help="consolidate a checkpoint into one torch.save or .safetensors file",
    )
    add_checkpoint_arguments(p)
    p.add_argument(
        "out",
        type=_output_file,
        help="output file; .safetensors for safetensors, anything else for torch.save",
    )
    p.add_argument(
        "--trusted", action="store_true", help="allow full unpickling of non-tensor values"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "cp", parents=[common], help="copy committed checkpoints (data first, manifest last)"
    )
    p.add_argument("src", help="a checkpoint, or a Checkpointer root (every committed step)")
    p.add_argument("dst", help="where the copy goes (the same layout: a root gets the steps)")
    p.add_argument("--threads", type=int, default=8, help="parallel object copies (default 8)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint that exists at DST"
    )
    p.set_defaults(func=cmd_cp)
