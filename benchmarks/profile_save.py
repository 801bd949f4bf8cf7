"""Where a save's time goes against the local S3 server: CPU seconds of the saving process
and of the server, per save, next to the wall time.

    python -m benchmarks.profile_save [--size-mib 1024] [--reps 3] [--py-spy DIR]

On a 2-core machine the server (moto, pure Python) shares the cores with the saver, so a
save can go no faster than the server can take bytes. This prints, for a shardckpt save and
for the raw limit (boto3 PUTs of the same bytes as 64 MiB objects, 8 threads), the wall time
and the CPU each process burnt. With ``--py-spy DIR`` (``pip install py-spy``) it also records
flame graphs of both processes during one shardckpt save into DIR.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import boto3
import torch
import torch.distributed.checkpoint as dcp

from shardckpt import ShardWriter
from shardckpt.testing.servers import start_moto

MiB = 1 << 20


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(fn: Callable[[], None], server_pid: int) -> dict[str, float]:
    me = os.getpid()
    cpu0, server0, t0 = cpu_seconds(me), cpu_seconds(server_pid), time.perf_counter()
    fn()
    return {
        "wall_s": time.perf_counter() - t0,
        "saver_cpu_s": cpu_seconds(me) - cpu0,
        "server_cpu_s": cpu_seconds(server_pid) - server0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--py-spy", metavar="DIR", help="record flame graphs into DIR")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    n = args.size_mib * MiB // 4 // 64
    state = {f"t{i:02d}": torch.randn(n) for i in range(64)}
    server = start_moto()
    os.environ.update(server.env)
    server.create_bucket("prof")
    pid = server.proc.pid
    client = boto3.client("s3", endpoint_url=server.endpoint)
    raw = b"".join(bytes(t.numpy().tobytes()) for t in state.values())
    bodies = [raw[i : i + 64 * MiB] for i in range(0, len(raw), 64 * MiB)]
    counter = iter(range(10**6))

    def shardckpt_save() -> None:
        uri = f"s3://prof/shardckpt-{next(counter)}"
        dcp.save(state, storage_writer=ShardWriter(uri, endpoint=server.endpoint), no_dist=True)

    def raw_put() -> None:
        prefix = f"raw-{next(counter)}"
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda ib: client.put_object(
                        Bucket="prof", Key=f"{prefix}/{ib[0]}", Body=ib[1]
                    ),
                    enumerate(bodies),
                )
            )

    try:
        shardckpt_save()  # warm up both paths
        raw_put()
        rows: dict[str, list[dict[str, float]]] = {"shardckpt save": [], "raw PUT": []}
        for _ in range(args.reps):  # A B A B
            rows["shardckpt save"].append(measure(shardckpt_save, pid))
            rows["raw PUT"].append(measure(raw_put, pid))
        gb = args.size_mib * MiB / 1e9
        print(
            f"{args.size_mib} MiB, moto on 127.0.0.1, {os.cpu_count()} cores, medians of {args.reps}"
        )
        for name, runs in rows.items():
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(
                f"  {name:15s} wall {m['wall_s']:6.2f}s ({gb / m['wall_s']:.2f} GB/s)"
                f"  saver CPU {m['saver_cpu_s']:6.2f}s  server CPU {m['server_cpu_s']:6.2f}s"
                f"  ({m['server_cpu_s'] / m['wall_s']:.0%} of one core)"
            )
        if args.py_spy:
            os.makedirs(args.py_spy, exist_ok=True)
            spies = [
                subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--pid",
                        str(p),
                        "--rate",
                        "50",
                        "--nonblocking",
                        "--format",
                        "flamegraph",
                        "-o",
                        os.path.join(args.py_spy, f"{name}.svg"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name, p in (("saver", os.getpid()), ("server", pid))
            ]
            time.sleep(1.0)
            shardckpt_save()
            for spy in spies:
                spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
                spy.wait(timeout=60)
            print(f"flame graphs in {args.py_spy}/saver.svg and server.svg")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
