"""``python -m benchmarks [--quick] [--name NAME] ...``: see ``--help``."""

from __future__ import annotations

import argparse
import logging
import sys

from benchmarks import peer_env, systems
from benchmarks.harness import OUT_DIR, Config, run
from benchmarks.workloads import Workload, format_size, parse_size


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Side-by-side DCP checkpoint benchmark on a local S3 server: shardckpt, "
        "s3torchconnector's DCP writer/reader, FileSystemWriter+upload, DCP's FsspecWriter and "
        "Lightning over s3fs, and the raw limits.",
    )
    p.add_argument(
        "--server",
        choices=["seaweedfs", "moto", "rclone"],
        default="seaweedfs",
        help="the local S3 server (default seaweedfs: Go, disk-backed, checks conditional "
        "writes, credentials and checksums; moto: single-threaded Python that reads the whole "
        "object for every ranged GET; rclone: ignores If-None-Match, so shardckpt commits "
        "there with unsafe_unconditional_commit)",
    )
    p.add_argument(
        "--quick", action="store_true", help="64 MiB, 2 reps: a check that every path works"
    )
    p.add_argument("--name", help="results go to OUT_DIR/NAME.json/.png (default: quick or full)")
    p.add_argument(
        "--out-dir",
        default=OUT_DIR,
        help=f"folder for NAME.json and NAME.png (default ./{OUT_DIR}; the tracked figures: "
        "benchmarks/results)",
    )
    p.add_argument(
        "--workloads",
        type=_csv,
        help="SIZE-COUNT or preset list, e.g. 1gib-64,256mib-16,10k-small,transformer "
        "(default 1gib-64; 10k-small: 10,000 tensors of 64 KiB; transformer: a small "
        "nn.TransformerEncoder and its AdamW state, a replica per rank)",
    )
    p.add_argument(
        "--sizes", type=_csv, help="sweep total state size, e.g. 64mib,256mib,1gib (with --tensors)"
    )
    p.add_argument(
        "--tensors", type=int, default=64, help="tensors per workload for --sizes (default 64)"
    )
    p.add_argument(
        "--world-sizes", type=_csv, default=["1", "2"], help="ranks, e.g. 1,2 (default 1,2)"
    )
    p.add_argument(
        "--systems",
        type=_csv,
        default=list(systems.ALL),
        help=f"subset of {','.join(systems.ALL)}. s3fs (the fsspec peers "
        f"{' and '.join(peer_env.SYSTEMS)}) needs an older botocore than this environment's: "
        "a run with them and without s3fs here runs in its own virtual environment, created "
        f"on first use (about a minute) in {peer_env.VENV} (SHARDCKPT_BENCH_FSSPEC_VENV), "
        "which sees this one's packages behind its own s3fs, aiobotocore, botocore and boto3",
    )
    p.add_argument("--reps", type=int, help="timed reps per system (default 3; 2 with --quick)")
    p.add_argument(
        "--cap-seconds",
        type=float,
        default=180.0,
        help="stop repeating a system whose save+load exceeds this",
    )
    p.add_argument("--no-count", action="store_true", help="skip the untimed request-counting pass")
    p.add_argument(
        "--s3tc-reader",
        default="dcp_optimized",
        choices=["dcp_optimized", "sequential", "range_based"],
        help="S3ReaderConstructor for s3torchconnector's reader (default dcp_optimized, its reader's default)",
    )
    args = p.parse_args(argv)
    if args.workloads and args.sizes:
        p.error("give --workloads or --sizes, not both")
    if args.sizes:
        workloads = [f"{format_size(parse_size(s))}-{args.tensors}" for s in args.sizes]
    else:
        workloads = args.workloads or (["64mib-64"] if args.quick else ["1gib-64"])
    world_sizes = tuple(int(w) for w in args.world_sizes)
    for w in workloads:
        for ws in world_sizes:
            try:
                Workload.parse(w, ws)  # fail now, not after minutes of other workloads
            except ValueError as exc:
                p.error(str(exc))
    reps = args.reps or (2 if args.quick else 3)
    return Config(
        name=args.name or ("quick" if args.quick else "full"),
        workloads=tuple(workloads),
        world_sizes=world_sizes,
        systems=tuple(args.systems),
        reps=reps,
        cap_seconds=args.cap_seconds,
        count_requests=not args.no_count,
        connector_reader=args.s3tc_reader,
        out_dir=args.out_dir,
        server=args.server,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # first: --help and bad arguments leave the process's logging alone
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("shardckpt", "botocore", "boto3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if peer_env.needed(args.systems):
        peer_env.rerun_in_env(sys.argv[1:] if argv is None else argv)
    run(args)


if __name__ == "__main__":
    main()
