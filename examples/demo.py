"""The main job: a 2-rank training run that checkpoints to a local S3 server, is
"preempted", resumes from its latest checkpoint, and matches an uninterrupted run.

    python examples/demo.py            # local S3 server (moto) on 127.0.0.1, started here
    python examples/demo.py --local    # the embedded local-filesystem store instead
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from shardckpt.testing.servers import start_moto

HERE = os.path.dirname(os.path.abspath(__file__))


def train(root: str, env: dict[str, str], losses: str, *extra: str) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        os.path.join(HERE, "train.py"),
    ]
    command += ["--ckpt", root, "--steps", "40", "--save-every", "10", "--losses", losses, *extra]
    subprocess.run(command, env=env, check=True)


def read_losses(path: str) -> dict[int, float]:
    with open(path) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--local", action="store_true", help="use a local folder instead of a local S3 server"
    )
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="shardckpt-demo-")
    env = dict(os.environ, TORCH_CPP_LOG_LEVEL="ERROR", OMP_NUM_THREADS="1")
    server = None
    if args.local:
        root = os.path.join(work, "checkpoints")
    else:
        server = start_moto()
        server.create_bucket("demo")
        env.update(server.env, AWS_ENDPOINT_URL=server.endpoint)
        root = "s3://demo/run"
        print(f"local S3 server (moto) at {server.endpoint}; checkpoints under {root}", flush=True)
    try:
        print("== uninterrupted run to step 40", flush=True)
        train(root + "-reference", env, os.path.join(work, "reference.jsonl"))
        print("== run preempted after step 25 (last checkpoint: step 20)", flush=True)
        train(root, env, os.path.join(work, "first.jsonl"), "--stop-at", "25")
        print("== restarted run resumes from the latest checkpoint", flush=True)
        train(root, env, os.path.join(work, "resumed.jsonl"))
    finally:
        if server is not None:
            server.stop()
    reference, resumed = (
        read_losses(os.path.join(work, "reference.jsonl")),
        read_losses(os.path.join(work, "resumed.jsonl")),
    )
    first_resumed = min(resumed)
    same = all(resumed[s] == reference[s] for s in resumed)
    print(
        f"resumed at step {first_resumed}; losses of steps {first_resumed}-{max(resumed)} identical to the uninterrupted run: {same}"
    )
    print(
        f"step {first_resumed} loss: resumed {resumed[first_resumed]:.6f}, uninterrupted {reference[first_resumed]:.6f}"
    )
    if first_resumed != 21 or not same:
        sys.exit("demo FAILED: the resumed run diverged from the uninterrupted one")


if __name__ == "__main__":
    main()
