"""launch/torchtitan.sh as users run it: torchtitan's own trainer (llama3 debug model, 2 gloo
ranks on the CPU) checkpointing through shardckpt to a moto server the script starts, the whole
run killed with SIGKILL after a commit, then resumed from it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torchtitan", reason="needs the torchtitan extra (Python >= 3.11)")

pytestmark = pytest.mark.slow

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_killed_run_resumes_from_the_last_committed_step() -> None:
    env = dict(
        os.environ,
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        NPROC="2",
        STEPS="8",
        KILL_AT="5",
    )
    env.pop("ENDPOINT", None)  # the script starts its own moto server
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "torchtitan.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "killed the first run after step 5 was committed" in done.stderr
    started = re.search(r"Training starts at step (\d+), trained to step 8", done.stderr)
    assert started, done.stderr[-4000:]
    # resumed from step 5 (or a later commit the kill did not beat), never from scratch
    assert 6 <= int(started.group(1)) <= 8
