"""``python -m benchmarks.load_bench`` end to end at a tiny size: every rep is recorded with
shardckpt's phases, and the ratio to the raw GET is there."""

from __future__ import annotations

import json

from benchmarks import load_bench


def test_load_bench_records_phases_and_the_ratio_to_raw(tmp_path) -> None:  # type: ignore[no-untyped-def]
    output = tmp_path / "load_bench.json"
    argv = ["--server", "moto", "--size-mib", "4", "--tensors", "4", "--reps", "2"]
    assert load_bench.main([*argv, "--output", str(output)]) == 0
    document = json.loads(output.read_text())
    samples, summary = document["samples"], document["summary"]
    assert [len(samples[name]) for name in ("shardckpt", "raw")] == [2, 2]
    for sample in samples["shardckpt"]:
        assert set(sample["phases"]) == {"open", "manifest", "data", "dcp"}
        assert sample["phases"]["data"] > 0 and sample["cpu_seconds"] >= 0
        assert 0 < sum(sample["phases"].values()) <= sample["seconds"] * 1.01
    assert len(summary["shardckpt"]["speed_of_raw_per_rep"]) == 2
    assert summary["shardckpt"]["speed_of_raw"] > 0 and summary["raw"]["speed_of_raw"] == 1.0
