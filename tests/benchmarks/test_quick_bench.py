"""CI smoke test of the benchmark harness: ``python -m benchmarks --quick`` runs every system
end to end on a local SeaweedFS server (the fsspec peers in their own environment, created on
first use) and writes a complete results file. Timings are not checked (they depend on the
machine), only that every figure is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import systems
from benchmarks.__main__ import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 600  # --quick takes about 2 minutes on 2 busy cores


@pytest.mark.slow
def test_quick_bench_writes_complete_results(tmp_path) -> None:  # type: ignore[no-untyped-def]
    command = [sys.executable, "-m", "benchmarks", "--quick", "--name", "ci-smoke"]
    command += ["--out-dir", str(tmp_path)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"--quick ran over {TIMEOUT_S}s; stderr tail:\n{str(exc.stderr)[-3000:]}")
    assert done.returncode == 0, f"exit {done.returncode}; stderr tail:\n{done.stderr[-3000:]}"
    assert "[" in done.stderr and "rep 1" in done.stderr, "no progress lines on stderr"

    with open(tmp_path / "ci-smoke.json") as f:
        results = json.load(f)
    assert results["name"] == "ci-smoke"
    assert results["config"]["server"] == "seaweedfs"
    assert results["server"]["kind"] == "seaweedfs" and "4." in results["server"]["version"]
    assert "elapsed_s" in results, "the run did not finish writing its results"
    labels = [w["label"] for w in results["workloads"]]
    assert labels == ["64mib-64/ws1", "64mib-64/ws2"]
    for w in results["workloads"]:
        assert list(w["systems"]) == list(systems.ALL), w["label"]
        for name, s in w["systems"].items():
            where = f"{w['label']} {name}"
            assert s["failed"] is None, f"{where} failed: {s['failed']}"
            assert s["bit_exact"] == "OK", f"{where}: bit_exact {s['bit_exact']}"
            median = s["median"]
            assert median is not None, f"{where}: no median"
            assert median["reps"] == 2, where
            for op in ("save", "load"):
                assert median[f"{op}_s"] > 0 and median[f"{op}_gbps"] > 0, where
            if name in ("checkpointer", "async_save"):  # returns before it is committed
                assert 0 < median["blocked_s"] < median["save_s"], where
            else:
                assert median["blocked_s"] == median["save_s"], where
            if name != "memcpy":  # the only system that does not talk to S3
                assert s["requests"]["save"] and s["requests"]["load"], where
        others = [n for n in systems.ALL if n != "shardckpt"]
        assert sorted(w["ratios"]) == sorted(others), w["label"]
        for name, r in w["ratios"].items():
            assert r["save"] > 0 and r["load"] > 0, f"{w['label']} ratio vs {name}"
        assert set(w["best_peer"].values()) <= set(systems.PEERS), w["label"]

    # Re-rendering from the raw reps reproduces the medians the run wrote.
    command = [sys.executable, "-m", "benchmarks.report", str(tmp_path / "ci-smoke.json")]
    redone = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert redone.returncode == 0, redone.stderr[-3000:]
    with open(tmp_path / "ci-smoke.json") as f:
        assert json.load(f)["workloads"] == results["workloads"]
    assert "best peer:" in redone.stdout and (tmp_path / "ci-smoke.png").exists()


def test_the_server_is_seaweedfs_unless_chosen() -> None:
    assert parse_args([]).server == "seaweedfs"
    assert parse_args(["--server", "moto"]).server == "moto"
    with pytest.raises(SystemExit):
        parse_args(["--server", "minio"])


@pytest.mark.slow
def test_gpu_bench_sections_run_on_the_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The GPU script runs only where a GPU is lent; ``--device cpu`` keeps it from rotting."""
    out = tmp_path / "gpu.json"
    command = [sys.executable, "-m", "benchmarks.gpu_bench", "--device", "cpu", "--size-mib", "8"]
    command += ["--reps", "1", "--model", "32,2,64,1", "--batch", "2,8", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"exit {done.returncode}; stderr tail:\n{done.stderr[-3000:]}"
    with open(out) as f:
        results = json.load(f)
    sections = ["bandwidth", "snapshot", "load", "overlap_blocking_s", "model_snapshot"]
    sections += ["step_time", "peers"]
    assert list(results["section_s"]) == sections
    failed = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert not failed, failed
    assert results["snapshot"]["staged_bytes"] == results["snapshot"]["bytes"]


@pytest.mark.slow
def test_incremental_bench_quick_writes_its_results(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "incremental.json"
    command = [sys.executable, "-m", "benchmarks.incremental_bench", "--quick", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"exit {done.returncode}; stderr tail:\n{done.stderr[-3000:]}"
    with open(out) as f:
        results = json.load(f)
    frozen = results["90% frozen, moto"]["summary"]
    assert frozen["bytes_ratio"] < 0.5  # the frozen 90% went up once, not 3 times
    changing = results["fully changing, local store"]["summary"]
    assert 0.9 < changing["bytes_ratio"] < 1.1  # nothing to reuse: the same bytes
    load = results["2-rank replicated load, moto"]["summary"]
    assert sum(load["shared fetch"]["bytes_got_mib_per_rank"]) < 0.75 * sum(
        load["every rank fetches"]["bytes_got_mib_per_rank"]
    )
