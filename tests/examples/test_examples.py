"""The examples, run as users run them: torchrun with 2 CPU ranks, killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # warnings shown: the examples print none


def _torchrun(script: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        os.path.join(EXAMPLES, script),
        *args,
    ]


def _losses(path: str) -> dict[int, float]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def test_demo_resumes_with_identical_losses_against_local_s3() -> None:
    done = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "demo.py")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "identical to the uninterrupted run: True" in done.stdout
    # torch's "torch.distributed is disabled", FSDP2's "returned a view tensor": none, on any rank
    assert [line for line in done.stderr.splitlines() if "Warning" in line] == [], done.stderr


def test_sigterm_saves_a_final_checkpoint_and_resume_matches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ckpt, first, resumed, reference = (
        str(tmp_path / n) for n in ("ckpt", "first.jsonl", "resumed.jsonl", "ref.jsonl")
    )
    job = subprocess.Popen(
        _torchrun(
            "preemption.py",
            "--ckpt",
            ckpt,
            "--steps",
            "100000",
            "--save-every",
            "10",
            "--losses",
            first,
        ),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while max(_losses(first), default=0) < 15:
        assert job.poll() is None and time.monotonic() < deadline, "training did not get going"
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    out, _ = job.communicate(timeout=300)
    # torchrun itself exits non-zero after a SIGTERM; the workers saved and exited cleanly.
    assert "preempted: saved step" in out, out[-3000:]
    stopped = int(out.split("preempted: saved step ")[1].split(",")[0])
    assert stopped == max(_losses(first))

    subprocess.run(
        _torchrun(
            "preemption.py", "--ckpt", ckpt, "--steps", str(stopped + 2), "--losses", resumed
        ),
        env=ENV,
        check=True,
        timeout=300,
        capture_output=True,
    )
    subprocess.run(
        _torchrun(
            "preemption.py",
            "--ckpt",
            str(tmp_path / "ref"),
            "--steps",
            str(stopped + 2),
            "--save-every",
            "1000",
            "--losses",
            reference,
        ),
        env=ENV,
        check=True,
        timeout=300,
        capture_output=True,
    )
    after, ref = _losses(resumed), _losses(reference)
    assert min(after) == stopped + 1, "the restarted job resumes right after the final save"
    assert after[stopped + 1] == ref[stopped + 1] and after[stopped + 2] == ref[stopped + 2]


def test_torchrun_launcher_without_nvidia_smi_uses_two_processes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """launch/torchrun.sh on a machine without GPUs (no nvidia-smi on PATH): 2 processes,
    a real run that commits its checkpoints (it used to exit 127 with no message)."""
    script = os.path.join(EXAMPLES, "..", "launch", "torchrun.sh")
    path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"])
    ckpt = tmp_path / "ckpt"
    done = subprocess.run(
        ["bash", script, "--steps", "4", "--save-every", "2", "--parallel", "ddp"],
        env=dict(ENV, PATH=path, CKPT=str(ckpt)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"torchrun.sh: 2 processes, checkpoints under {ckpt}" in done.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-0000000002", "step-0000000004"]
