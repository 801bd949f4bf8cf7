"""Garbage collection removes exactly the garbage: unreferenced data past its grace period,
stale uploads, checkpoints beyond keep_last; never committed data or a save in progress."""

from __future__ import annotations

import os
import time
import uuid

import torch

from shardckpt import Checkpointer
from shardckpt.store import open_store


def _age(path: str, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_gc_removes_only_old_unreferenced_data(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "run"
    with Checkpointer(root) as ck:
        for step in (1, 2, 3):
            ck.save(step, {"w": torch.full((1000,), float(step))})
        ck.wait()
    store = open_store(str(root))
    # A crashed attempt inside committed step 2, an uncommitted step 4, a fresh in-progress
    # step 5, and a stale temporary file of an interrupted local put.
    store.put("step-0000000002/attempt-00000000000dead0/rank0-000000", [b"x" * 10])
    store.put("step-0000000004/attempt-0000000c4a5bed00/rank0-000000", [b"y" * 20])
    store.put("step-0000000005/attempt-000000004a4a4a4a/rank0-000000", [b"z" * 30])
    stale_tmp = root / "step-0000000003" / f".rank9-000000.tmp-shardckpt-{uuid.uuid4().hex}"
    stale_tmp.write_bytes(b"partial")
    for key in (
        "step-0000000002/attempt-00000000000dead0/rank0-000000",
        "step-0000000004/attempt-0000000c4a5bed00/rank0-000000",
    ):
        _age(str(root / key), 7200)
    _age(str(stale_tmp), 7200)

    with Checkpointer(root, keep_last=2) as ck:
        dry = ck.gc(dry_run=True)
        assert dry is not None and len(dry.garbage_objects) == 2 and dry.retired_checkpoints
        assert (root / "step-0000000004").exists()  # dry run changed nothing
        report = ck.gc()
        assert report is not None
        assert sorted(os.path.basename(u) for u in report.garbage_objects) == [
            "rank0-000000",
            "rank0-000000",
        ]
        assert report.garbage_bytes == 30
        assert len(report.aborted_uploads) == 1 and not stale_tmp.exists()
        assert [u.rsplit("/", 1)[1] for u in report.retired_checkpoints] == ["step-0000000001"]
        assert ck.steps() == [2, 3]
        for step in (2, 3):
            out = {"w": torch.zeros(1000)}
            ck.load(out, step=step)
            assert torch.equal(out["w"], torch.full((1000,), float(step)))
    assert not (root / "step-0000000004").exists()
    assert (root / "step-0000000005" / "attempt-000000004a4a4a4a" / "rank0-000000").exists()
