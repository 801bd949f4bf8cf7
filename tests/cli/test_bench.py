"""``shardckpt bench URI``: a checkpoint saved, loaded bit-exact and timed against raw PUT/GET
of the same bytes, under a fresh prefix of URI, then exactly the keys it wrote deleted (keys
planted under URI, even inside names like its own, survive). It runs from the package alone:
no ``./benchmarks`` is imported."""

from __future__ import annotations

import re

import pytest

from shardckpt.cli.main import main
from shardckpt.store import open_store
from tests.cli.run import endpoint_args, shardckpt
from tests.conftest import Target
from tests.retention.foreign import LOOKALIKES, missing_or_changed, plant

_SMALL = ["--size-mib", "2", "--tensors", "3", "--reps", "2"]


def test_bench_times_save_and_load_and_deletes_only_what_it_wrote(
    target: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(target.uri, **target.options)
    foreign = {key: f"not ours: {key}".encode() for key in LOOKALIKES}
    foreign |= {
        "data.bin": b"a user's file",
        "shardckpt-bench-0123456789ab/manifest.json": b"{}",  # an earlier bench's name
        "shardckpt-bench-0123456789ab/raw-0/000000": b"raw",
    }
    plant(store, foreign)
    assert main(["bench", target.uri, *_SMALL, *endpoint_args(target)]) == 0
    out = capsys.readouterr().out
    first, _, *rows, last = out.strip().splitlines()
    assert re.fullmatch(
        re.escape(target.uri)
        + r"/shardckpt-bench-[0-9a-f]{12}: 2\.0 MiB in 3 tensors, median of 2 reps",
        first.removeprefix("file://"),
    ), out
    assert [r[:8].strip() for r in rows] == ["save", "load", "raw PUT", "raw GET"], out
    assert rows[2].endswith("100%") and rows[3].endswith("100%")
    # Each rep: a manifest, one data object (2 MiB fit one) and one raw object.
    assert last == "deleted the 6 objects it wrote"
    assert missing_or_changed(store, foreign) == []
    assert sorted(o.key for o in store.list("")) == sorted(foreign)


def test_bench_runs_the_package_not_the_benchmarks_folder_of_the_working_directory(
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    """``shardckpt bench`` imported ``benchmarks`` from the working directory and ran it."""
    planted = tmp_path / "benchmarks"
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    (planted / "__main__.py").write_text(
        "import pathlib\n"
        "pathlib.Path(__file__).with_name('RAN').write_text('')\n"
        "def main(argv=None):\n    return 3\n"
    )
    done = shardckpt("bench", str(tmp_path / "store"), *_SMALL, cwd=str(tmp_path))
    assert done.code == 0, done.err
    assert "deleted the 6 objects it wrote" in done.out
    assert not (planted / "RAN").exists()


def test_bench_refuses_an_empty_workload_in_one_line(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", str(tmp_path), "--reps", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shardckpt: error: ") and "reps" in err[0], err
    assert list(tmp_path.iterdir()) == []
