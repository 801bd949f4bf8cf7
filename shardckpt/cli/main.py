"""The ``shardckpt`` command: list, inspect, verify, clean up, export and copy checkpoints.

Exit codes: 0 success; 1 a failure (one line, ``shardckpt: error: ...``, naming the URI and
cause), or ``verify`` found damage; 2 bad usage; 130 interrupted (Ctrl-C). An S3 request
that goes unanswered is given up after ``--timeout`` (30 s), retries included, not after
the library's 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from tqdm import tqdm

from shardckpt._util.bytes import crc32c
from shardckpt._util.duration import duration
from shardckpt.errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    ObjectExistsError,
    ShardckptError,
)
from shardckpt.format.catalog import (
    DISCOVERY_DEPTH,
    CheckpointEntry,
    committed_steps,
    data_users,
    discover_checkpoints,
    find_checkpoints,
    step_name,
)
from shardckpt.format.layout import Layout
from shardckpt.format.manifest import Manifest, ObjectRecord, fetch_manifest, read_manifest
from shardckpt.retention.garbage import collect_garbage
from shardckpt.store import ObjectStore, open_store
from shardckpt.store.base import gather
from shardckpt.store.s3_config import timeout_options
from shardckpt.tools.mirror import add_mirror_command
from shardckpt.tools.single import load as load_single
from shardckpt.tools.verify import verify_checkpoint
from shardckpt.uri import parse_uri


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (bytes, rate, ETA), fed by the library's ``on_bytes(n, total)``
    callbacks from any thread; ``label`` is short (a URI would leave no room for the bar).
    tqdm draws it only on a terminal (``disable=None``): a piped or logged stderr gets nothing."""
    lock = threading.Lock()  # tqdm's counter is not thread-safe
    with tqdm(
        desc=label,
        unit="iB",  # with unit_divisor 1024: KiB, MiB, GiB
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=None,
        dynamic_ncols=True,
    ) as bar:

        def on_bytes(n: int, total: int) -> None:
            with lock:
                bar.total = total  # known once the library has read the manifest
                bar.update(n)

        yield on_bytes


def _store_options(args: argparse.Namespace) -> dict[str, Any]:
    """The store options of the common arguments."""
    options = {
        k: getattr(args, k)
        for k in ("endpoint", "region", "profile", "transport")
        if getattr(args, k)
    }
    return {**options, **timeout_options(args.timeout)}


def _store(args: argparse.Namespace, uri: str) -> ObjectStore:
    return open_store(uri, **_store_options(args))


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


def _checkpoint_layout(store: ObjectStore, step: int | None) -> Layout:
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


def cmd_ls(args: argparse.Namespace) -> int:
    store = _store(args, args.uri)
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
            f"{step:>10}  {r['status']:<10}  {r['format']:<9}  {_size(r['bytes']):>10}  {r['objects']:>7}  {r['world_size']:>5}  {_age(r['age_s']):>5}  {r['uri']}{note}"
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
    store = _store(args, args.uri)
    layout = _checkpoint_layout(store, args.step)
    manifest = read_manifest(store, layout)
    md = manifest.metadata
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.created))
    print(f"checkpoint {store.uri(layout.prefix)}")
    print(
        f"  format v{manifest.version}, world size {manifest.world_size}, created {created}, {_size(manifest.total_bytes)} in {len(manifest.objects)} objects"
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


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args, args.uri)
    layout = _checkpoint_layout(store, args.step)
    # A manifest a load would refuse: one `shardckpt: error:` line naming why (main), exit 1.
    with _progress("verify") as on_bytes:
        report = verify_checkpoint(store, layout, num_threads=args.threads, on_bytes=on_bytes)
    for uri, problem in sorted(report.problems.items()):
        print(f"DAMAGED {uri}: {problem}")
    status = "OK" if report.ok else f"{len(report.problems)} of {report.objects} objects damaged"
    print(f"{store.uri(layout.prefix)}: {report.objects} objects, {_size(report.bytes)}: {status}")
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace) -> int:
    store = _store(args, args.uri)
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
        f"({_size(report.garbage_bytes)}), {len(report.aborted_uploads)} unfinished uploads"
    )
    print(
        f"held back as younger than the grace period ({args.grace:g}s): {report.held_back_objects} "
        f"unreferenced objects ({_size(report.held_back_bytes)}), {report.held_back_uploads} unfinished uploads"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = _store(args, args.uri)
    layout = _checkpoint_layout(store, args.step)
    uri = store.uri(layout.prefix)
    with _progress("export") as on_bytes:
        state = load_single(uri, trusted=args.trusted, on_bytes=on_bytes, **_store_options(args))
    if args.out.endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ShardckptError(
                "writing .safetensors needs the safetensors package: pip install safetensors"
            ) from None
        flat = _flat_tensors(state)
        save_file({k: v.contiguous() for k, v in flat.items()}, args.out)
        print(f"wrote {len(flat)} tensors to {args.out}")
    else:
        torch.save(state, args.out)
        print(f"wrote {args.out}")
    return 0


def _flat_tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {prefix.rstrip("."): value}
    out: dict[str, torch.Tensor] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(_flat_tensors(v, f"{prefix}{k}."))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            out.update(_flat_tensors(v, f"{prefix}{i}."))
    return out  # non-tensor values have no place in safetensors


def cmd_cp(args: argparse.Namespace) -> int:
    src, dst = _store(args, args.src), _store(args, args.dst)
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
            _progress(f"cp {layout.name}".strip()) as on_bytes,
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
            f"copied {src.uri(layout.prefix)} -> {dst.uri(layout.prefix)} ({_size(manifest.total_bytes)})"
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


def run_bench(bench_args: list[str]) -> int:
    # The harness is not installed with the package: find it in the checkout we run from.
    if os.path.isdir(os.path.join(os.getcwd(), "benchmarks")) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError:
        raise ShardckptError(
            "the benchmark harness lives in the source checkout: run `shardckpt bench` from its root"
        ) from None
    return int(bench_main(bench_args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    sub = parser.add_subparsers(dest="command", required=True)

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

    for name, func, text in (
        ("inspect", cmd_inspect, "show a checkpoint's keys, shapes, dtypes and sharding"),
        ("verify", cmd_verify, "re-read every object and check sizes and CRC32Cs"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("uri", help="a checkpoint, or a Checkpointer root (latest step by default)")
        p.add_argument("--step", type=int, help="which step under a Checkpointer root")
        p.add_argument("--threads", type=int, default=8, help="parallel reads (verify; default 8)")
        p.set_defaults(func=func)

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

    p = sub.add_parser(
        "export",
        parents=[common],
        help="consolidate a checkpoint into one torch.save or .safetensors file",
    )
    p.add_argument("uri", help="a checkpoint, or a Checkpointer root (latest step by default)")
    p.add_argument(
        "out",
        type=_output_file,
        help="output file; .safetensors for safetensors, anything else for torch.save",
    )
    p.add_argument("--step", type=int, help="which step under a Checkpointer root")
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

    add_mirror_command(sub, parents=[common])

    # No help of its own: `shardckpt bench --help` shows the harness's options.
    p = sub.add_parser(
        "bench", add_help=False, help="run the benchmark harness (from a source checkout)"
    )
    p.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="arguments for python -m benchmarks"
    )
    p.set_defaults(func=lambda args: run_bench(args.bench_args))
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
        if argv[:1] == ["bench"]:  # everything after it, --help included, is the harness's
            return run_bench(argv[1:])
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
