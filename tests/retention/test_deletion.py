"""What each deleting entry point may delete (issue 13, items 2, 3, 4 and 9a, and the rule's
other cases), on the local store and on S3 (moto over HTTP): shardckpt's own unreferenced
data, never a user's files, a mirrored DCP checkpoint, another job's local copies, or the
data a concurrent reader of a replaced Lightning checkpoint is reading."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

import shardckpt
from shardckpt import Checkpointer, ShardReader
from shardckpt.cli.main import main
from shardckpt.compat import load_all
from shardckpt.format.layout import Layout
from shardckpt.integrations.lightning import ShardckptCheckpointIO
from shardckpt.store import open_store
from shardckpt.tools.mirror import Mirror
from shardckpt.tools.verify import verify_checkpoint
from tests.conftest import Target, make_target
from tests.retention.foreign import LOOKALIKES, missing_or_changed, plant

USER_FILES = {
    "README.txt": b"my notes",
    "datasets/train.bin": bytes(range(256)) * 64,
    "eval/results.json": b'{"acc": 0.9}',
}
CRASHED = "attempt-00000000000c4a5b/rank0-000000"  # what a crashed save leaves


@pytest.fixture(params=["local", "moto-boto3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    return make_target(request.param, request, tmp_path)


def _cli(where: Target, *args: str) -> int:
    endpoint = where.options.get("endpoint")
    return main([*args, *(["--endpoint", str(endpoint)] if endpoint else [])])


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 16, generator=g), "b": torch.randn(16, generator=g)}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gc_never_deletes_user_files_beside_a_checkpoint(
    where: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 2: a prefix holding one checkpoint (shardckpt.save, i.e. dcp.save + ShardWriter)
    and the user's own files; then a crashed save's attempt beside them; then a prefix where
    only the crashed attempt and user files are (no manifest)."""
    shardckpt.save(_state(1), where.uri, **where.options)
    store = where.open()
    plant(store, USER_FILES)
    assert _cli(where, "gc", where.uri, "--grace", "0s") == 0
    assert missing_or_changed(store, USER_FILES) == []
    assert _same(shardckpt.load(where.uri, **where.options), _state(1))

    store.put(CRASHED, [b"half a shard"])
    assert _cli(where, "gc", where.uri, "--dry-run") == 0  # grace 1h: held back, and said so
    out = capsys.readouterr().out
    assert "0 unreferenced objects" in out and "1 unreferenced objects (12 B)" in out
    assert _cli(where, "gc", where.uri, "--grace", "0s") == 0
    assert f"deleted {store.uri(CRASHED)}" in capsys.readouterr().out
    assert store.head(CRASHED) is None and missing_or_changed(store, USER_FILES) == []
    assert verify_checkpoint(store, Layout("")).ok

    crashed_only = open_store(f"{where.uri}/crashed", **where.options)
    plant(crashed_only, {**USER_FILES, CRASHED: b"half a shard"})
    assert _cli(where, "gc", f"{where.uri}/crashed", "--grace", "0s") == 0
    assert crashed_only.head(CRASHED) is None
    assert missing_or_changed(crashed_only, USER_FILES) == []


def test_mirrored_dcp_checkpoint_is_committed_for_ls_and_never_collected(
    where: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 3: what `shardckpt mirror` uploaded (a FileSystemWriter directory)."""
    local = tmp_path / "checkpoints"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_state(2), storage_writer=FileSystemWriter(str(local / "step-100")), no_dist=True)
    assert _cli(where, "mirror", str(local), where.uri, "--once") == 0
    store = where.open()
    uploaded = {o.key: store.get(o.key) for o in store.list("")}
    assert "step-100/.metadata" in uploaded
    capsys.readouterr()

    assert _cli(where, "ls", where.uri, "--all", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["status"], r["objects"]) for r in rows] == [
        (100, "committed", len(uploaded))
    ]
    assert rows[0]["format"] == "dcp"
    assert _cli(where, "gc", where.uri, "--dry-run", "--grace", "0s") == 0
    assert "step-100" not in capsys.readouterr().out
    assert _cli(where, "gc", where.uri, "--grace", "0s", "--keep-last", "1") == 0
    assert missing_or_changed(store, uploaded) == []


def test_local_copy_deletes_only_files_this_process_put_there(
    where: Target, tmp_path: Path
) -> None:
    """Item 4: Checkpointer(local_copy=DIR) in a directory shared with other data."""
    fast = tmp_path / "nvme"
    others = {
        "dataset.bin": b"tokens" * 100,
        "other-job/step-0000000001/manifest.json": b"{}",
        # Another job's copies, named exactly as ours are.
        "step-0000000001/attempt-0123456789abcdef/rank0-000000": b"another job's shard",
        "step-0000000002/attempt-00000000deadbeef/rank0-000000": b"another job's shard",
    }
    plant(open_store(str(fast)), others)
    with Checkpointer(where.uri, keep_last=2, local_copy=fast, **where.options) as ck:
        for step in (1, 2, 3):
            ck.save(step, _state(step))
        ck.wait()
        assert ck.steps() == [2, 3]
        for step in (2, 3):
            out = _state(0)
            ck.load(out, step=step)
            assert _same(out, _state(step))
    local = open_store(str(fast))
    assert missing_or_changed(local, others) == []
    ours = {o.key.split("/")[0] for o in local.list("") if o.key not in others}
    assert ours == {"step-0000000003"}  # its own copies outside the newest are gone


def test_checkpointer_gc_waits_for_its_save_in_flight(where: Target) -> None:
    state = {"w": torch.randn(16 << 18)}  # 16 MiB in 1 MiB objects, one at a time
    with Checkpointer(where.uri, object_size=1 << 20, num_threads=1, **where.options) as ck:
        store = where.open()
        handle = ck.save(1, state)
        while not list(store.list("step-0000000001/")) and not handle.done():
            time.sleep(0.001)
        assert not handle.done(), "the save must still be uploading when gc starts"
        report = ck.gc(grace_s=0)
        assert report is not None and report.garbage_objects == []
        out = {"w": torch.zeros(16 << 18)}
        assert ck.load(out) == 1 and torch.equal(out["w"], state["w"])
    assert verify_checkpoint(store, Layout("step-0000000001")).ok


def _checkpoint(generation: int) -> dict[str, Any]:
    return {"global_step": generation, "state_dict": {"w": torch.full((300,), float(generation))}}


def test_lightning_overwrite_keeps_the_replaced_generation_and_remove_only_its_own(
    where: Target,
) -> None:
    """Item 9a: a reader that read last.ckpt's manifest finishes after an overwrite; the
    generation before goes at the next overwrite; remove deletes only shardckpt's keys."""
    run, last = f"{where.uri}/run", f"{where.uri}/run/last.ckpt"
    io = ShardckptCheckpointIO(**where.options)
    io.save_checkpoint(_checkpoint(1), last)
    io.wait()
    store = open_store(run, **where.options)
    foreign = {f"last.ckpt/{name}": name.encode() for name in ("notes.txt", *LOOKALIKES)}
    plant(store, foreign)
    layout = Layout("last.ckpt")
    first = {o.key for o in store.list("last.ckpt/")} - set(foreign) - {layout.manifest_key}

    reader = ShardReader(last, **where.options)
    reader.read_metadata()  # a concurrent reader has read generation 1's manifest
    io.save_checkpoint(_checkpoint(2), last)
    io.wait()
    state = load_all(reader)
    assert [t.tolist() for t in state["tensors"].values()] == [[1.0] * 300]

    io.save_checkpoint(_checkpoint(3), last)  # generation 1 goes now, 2 stays
    io.wait()
    assert all(store.head(k) is None for k in first)
    assert torch.equal(io.load_checkpoint(last)["state_dict"]["w"], torch.full((300,), 3.0))
    assert verify_checkpoint(store, layout).ok
    assert missing_or_changed(store, foreign) == []

    io.remove_checkpoint(last)
    io.wait()
    assert not io.exists(last)
    assert [o.key for o in store.list("last.ckpt/") if o.key not in foreign] == []
    assert missing_or_changed(store, foreign) == []
    io.teardown()


def test_mirror_delete_deletes_only_what_it_uploaded(where: Target, tmp_path: Path) -> None:
    store = where.open()
    others = {"other/data.bin": b"someone else's", "model.pt.bak": b"an old copy", **USER_FILES}
    plant(store, others)
    local = tmp_path / "local"
    local.mkdir()
    (local / "model.pt").write_bytes(b"weights")
    mirror = Mirror(local, store, settle_s=0.0, delete=True)
    assert mirror.sync_once().uploaded == ["model.pt"]
    (local / "model.pt").unlink()
    assert mirror.sync_once().deleted == ["model.pt"]
    assert store.head("model.pt") is None and missing_or_changed(store, others) == []
