"""``shardckpt ls`` as a newcomer meets it: pointed at a bucket, a Lightning dirpath or a
folder above Checkpointer roots; after an interrupted save; on an incremental run whose
retention retired the base. Through the command, on the local store and on moto."""

from __future__ import annotations

import json

import torch

import shardckpt
from shardckpt import Checkpointer
from shardckpt.store import open_store
from tests.cli.run import endpoint_args
from tests.cli.run import shardckpt as run_cli
from tests.conftest import Target


def _top(target: Target) -> str:
    """The bucket (S3) or folder (local) that holds the target's root."""
    return target.uri.rsplit("/", 1)[0] + "/"


def _ls(target: Target, uri: str, *args: str) -> tuple[list[dict[str, object]], str]:
    done = run_cli("ls", uri, "--json", *args, *endpoint_args(target))
    assert done.code == 0, done.err
    return json.loads(done.out), done.err


def test_ls_finds_checkpoints_below_the_uri(target: Target) -> None:
    """A bucket of runs, a Lightning dirpath, a folder above a Checkpointer root: each listed
    an empty table (exit 0) because only the URI and its step-* children were looked at."""
    top = _top(target)
    with Checkpointer(f"{top}proj/run1", **target.options) as ck:
        for step in (10, 20):
            ck.save(step, {"w": torch.full((8,), float(step))})
    for name in ("epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt"):  # Lightning's names
        shardckpt.save({"w": torch.arange(3)}, f"{top}lightning/{name}", **target.options)
    shardckpt.save({"w": torch.arange(3)}, f"{top}single", **target.options)
    shardckpt.save({"w": torch.arange(3)}, f"{top}a/b/c/too-deep", **target.options)
    open_store(top, **target.options).put("data/shard-0.bin", [b"not a checkpoint"])

    rows, err = _ls(target, top)
    found = {r["uri"]: r for r in rows}
    store = open_store(top, **target.options)
    expected = [
        "lightning/epoch=0-step=10.ckpt",
        "lightning/epoch=1-step=20.ckpt",
        "proj/run1/step-0000000010",
        "proj/run1/step-0000000020",
        "single",
    ]
    assert list(found) == [store.uri(p) for p in expected], err
    assert {r["status"] for r in rows} == {"committed"} and err == ""
    assert found[store.uri("proj/run1/step-0000000020")]["step"] == 20
    rows, _ = _ls(target, top, "--depth", "4")
    assert store.uri("a/b/c/too-deep") in [r["uri"] for r in rows]

    rows, _ = _ls(target, f"{top}lightning")  # a Lightning dirpath
    assert [r["uri"] for r in rows] == [store.uri(p) for p in expected[:2]]
    if target.name == "local":  # a plain path, no scheme, relative to the working directory
        done = run_cli("ls", "proj", cwd=top)
        assert done.code == 0 and done.err == "", done.err
        assert "step-0000000010" in done.out and "step-0000000020" in done.out


def test_ls_says_when_it_finds_nothing(target: Target) -> None:
    top = _top(target)
    shardckpt.save({"w": torch.arange(3)}, f"{top}a/b/c/d/ckpt", **target.options)
    rows, err = _ls(target, f"{top}nothing/here")
    assert rows == []
    uri = open_store(f"{top}nothing/here", **target.options).uri()
    assert err.startswith(f"shardckpt: no checkpoints under {uri} (looked 3 levels deep)")
    done = run_cli("ls", top, "--depth", "1", *endpoint_args(target))
    assert done.code == 0 and "(looked 1 level deep)" in done.err
    assert done.out.strip().startswith("STEP")  # the (empty) table's header
    open_store(target.uri, **target.options).put("attempt-0123456789abcdef/rank0-000000", [b"x"])
    _, err = _ls(target, target.uri)
    assert "no checkpoints" in err and "ls --all shows 1 without a manifest" in err
    if target.name == "local":  # `ls dev/` meant for s3://dev/
        done = run_cli("ls", "dev/", cwd=top)
        assert done.code == 0 and done.err.strip().endswith(
            "(looked 3 levels deep); no such folder (an S3 URI starts with s3://)"
        ), done.err


def test_ls_shows_the_committed_checkpoint_not_an_interrupted_saves_leftovers(
    target: Target,
) -> None:
    """After an interrupted save and a successful one at the same URI, ls showed the bytes
    and objects of both (``committed 1.0 GiB 18`` for a 12-byte state)."""
    store = open_store(target.uri, **target.options)
    leftover = "attempt-0123456789abcdef/rank0-000000"  # the interrupted save's data
    store.put(leftover, [bytes(1 << 20)])
    _, err = _ls(target, target.uri)
    rows, _ = _ls(target, target.uri, "--all")
    assert [(r["status"], r["bytes"], r["objects"]) for r in rows] == [("incomplete", 1 << 20, 1)]
    assert "garbage" in str(rows[0]["note"])

    shardckpt.save({"w": torch.arange(3, dtype=torch.int32)}, target.uri, **target.options)
    rows, _ = _ls(target, target.uri)
    assert [(r["status"], r["bytes"], r["objects"]) for r in rows] == [("committed", 12, 1)]
    assert store.head(leftover) is not None  # nothing was deleted to make it so
    done = run_cli("ls", target.uri, *endpoint_args(target))
    assert "12 B" in done.out and "MiB" not in done.out


def test_ls_all_labels_a_retired_incremental_base_for_what_it_is(target: Target) -> None:
    """Retention deletes an old step's manifest but keeps the data newer steps reuse: that
    step is retired, not incomplete, and its data is not garbage."""
    frozen = torch.randn(128, 128)
    with Checkpointer(target.uri, incremental=True, keep_last=2, **target.options) as ck:
        for step in (1, 2, 3):
            ck.save(step, {"frozen": frozen, "step": torch.tensor([step])})
        ck.wait()
        assert ck.steps() == [2, 3]
    store = open_store(target.uri, **target.options)
    rows, _ = _ls(target, target.uri, "--all")
    by_step = {r["step"]: r for r in rows}
    assert [r["status"] for r in rows] == ["retired", "committed", "committed"]
    retired = by_step[1]
    assert retired["note"] == "data used by step-2, step-3"
    assert retired["used_by"] == [store.uri("step-0000000002"), store.uri("step-0000000003")]
    assert retired["bytes"] >= frozen.nbytes and retired["objects"] == 1
    done = run_cli("ls", target.uri, "--all", *endpoint_args(target))
    line = next(x for x in done.out.splitlines() if "step-0000000001" in x)
    assert "retired" in line and "(data used by step-2, step-3)" in line
    assert "garbage" not in line and "incomplete" not in done.out
    # gc agrees: nothing of it is garbage.
    done = run_cli("gc", target.uri, "--grace", "0s", "--dry-run", *endpoint_args(target))
    assert done.code == 0 and "step-0000000001" not in done.out, done.out
    committed = [r for r in rows if r["status"] == "committed"]
    assert all(r["bytes"] > frozen.nbytes and r["world_size"] == 1 for r in committed)
