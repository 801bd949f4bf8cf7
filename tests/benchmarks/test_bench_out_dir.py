"""A user's ``python -m benchmarks`` writes to ./shardckpt-bench, never over the tracked
benchmarks/results figures; only an explicit ``--out-dir benchmarks/results`` writes there."""

from __future__ import annotations

import os

import pytest

from benchmarks.__main__ import parse_args
from tests.cli.run import ROOT, run_python

TRACKED = os.path.join(ROOT, "benchmarks", "results")


def _snapshot(folder: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def test_the_default_out_dir_is_in_the_working_directory(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    config = parse_args(["--quick"])
    assert os.path.abspath(config.out_dir) == str(tmp_path / "shardckpt-bench")
    assert parse_args(["--quick", "--out-dir", "benchmarks/results"]).out_dir == (
        "benchmarks/results"
    )


@pytest.mark.slow
def test_bench_quick_leaves_the_tracked_results_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    before = _snapshot(TRACKED)
    assert "quick.json" in before
    # The quick run, cut to the one system that needs no S3 traffic (about 20 s).
    args = ["--systems", "memcpy", "--world-sizes", "1", "--reps", "1", "--no-count"]
    done = run_python("-m", "benchmarks", "--quick", *args, cwd=str(tmp_path))
    assert done.code == 0, done.err[-3000:]
    written = tmp_path / "shardckpt-bench" / "quick.json"
    assert written.exists() and (tmp_path / "shardckpt-bench" / "quick.png").exists()
    assert f"results: {written}" in done.out
    assert _snapshot(TRACKED) == before
