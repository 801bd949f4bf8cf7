"""The deletion rule as a property: plant random keys shardckpt did not write at every level
of a root (beside checkpoints, inside step, attempt and Lightning folders, inside a mirrored
DCP checkpoint, in the local tier), with names that look like ours and bytes equal to our
data objects, then run every deleting entry point. Not one planted key may be deleted, and
every committed checkpoint must still load bit-exact and verify."""

from __future__ import annotations

import string
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import FileSystemWriter

import shardckpt
from shardckpt import Checkpointer
from shardckpt.format.catalog import step_name
from shardckpt.format.layout import Layout, is_own_key
from shardckpt.integrations.lightning import ShardckptCheckpointIO
from shardckpt.retention.garbage import collect_garbage
from shardckpt.store import ObjectStore, open_store
from shardckpt.tools.mirror import Mirror
from shardckpt.tools.verify import verify_checkpoint
from tests.conftest import make_target
from tests.retention.foreign import LOOKALIKES, missing_or_changed, plant

# Names of our own folders carry a '-', which random names lack, so none can collide.
CK, SINGLE, PL, MIRROR = "ck-root", "single-ckpt", "pl-run", "mirror-dst"
LAST, EPOCH = "last-gen.ckpt", "epoch-0.ckpt"

_random_name = st.text(string.ascii_letters + string.digits + "._", min_size=1, max_size=10)
_name = st.one_of(
    st.sampled_from(LOOKALIKES),
    _random_name.filter(lambda n: n.strip(".") and n not in ("manifest.json", ".metadata")),
)
# (folder index, name, bytes: random, or those of one of our data objects)
_foreign = st.tuples(st.integers(0, 1000), _name, st.one_of(st.binary(max_size=64), st.integers()))
# Another job's local copies are named exactly as ours are.
_local_name = st.one_of(
    _name, st.builds(lambda h: f"attempt-{h:016x}/rank0-000000", st.integers(0, 2**64 - 1))
)
_local_foreign = st.tuples(st.integers(0, 1000), _local_name, st.binary(max_size=64))


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"frozen": torch.arange(96.0), "w": torch.randn(32, 8, generator=g), "step": step}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(b[k], torch.Tensor) else a[k] == b[k] for k in b
    )


def _folders(store: ObjectStore) -> list[str]:
    """Every "directory" of the store, the root included, in key order."""
    found = {""}
    for info in store.list(""):
        parts = info.key.split("/")[:-1]
        found |= {"/".join(parts[: i + 1]) + "/" for i in range(len(parts))}
    return sorted(found)


def _in(folders: list[str], index: int, name: str) -> str:
    return folders[index % len(folders)] + name


def _plan(
    store: ObjectStore, drawn: list[tuple[int, str, Any]], ours: list[bytes], *, own_names: bool
) -> dict[str, bytes]:
    """The keys to plant: each drawn name in one of the store's folders, holding random bytes
    or those of one of ``ours``. Never an existing key, nor one whose path would turn a
    planted file into a folder; unless ``own_names``, never a name shardckpt's layout
    produces (a name drawn into a real attempt folder can complete one, and such a key is
    indistinguishable from our own: it is not foreign)."""
    folders = _folders(store)
    planted: dict[str, bytes] = {}
    for index, name, content in drawn:
        key = _in(folders, index, name)
        if store.head(key) is not None or (not own_names and is_own_key(key)):
            continue
        planted[key] = ours[content % len(ours)] if isinstance(content, int) else content
    return {k: v for k, v in planted.items() if not any(o.startswith(k + "/") for o in planted)}


@pytest.mark.parametrize("backend", ["local", "moto-boto3"])
def test_no_deleting_entry_point_deletes_a_foreign_key(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target = make_target(backend, request, tmp_path)
    opts = target.options

    @settings(max_examples=10, deadline=None)
    @given(
        drawn=st.lists(_foreign, min_size=1, max_size=16),
        drawn_local=st.lists(_local_foreign, max_size=6),
    )
    def example(
        drawn: list[tuple[int, str, Any]], drawn_local: list[tuple[int, str, bytes]]
    ) -> None:
        base = f"{target.uri}/{uuid.uuid4().hex[:8]}"
        scratch = tmp_path / uuid.uuid4().hex[:8]
        fast, source = scratch / "nvme", scratch / "checkpoints"
        store, ck_store = open_store(base, **opts), open_store(f"{base}/{CK}", **opts)

        # Checkpoints of every kind under one root.
        first = Checkpointer(f"{base}/{CK}", incremental=True, local_copy=fast, **opts)
        for step in (1, 2):
            first.save(step, _state(step))
        first.wait()
        shardckpt.save(_state(9), f"{base}/{SINGLE}", **opts)
        io = ShardckptCheckpointIO(**opts)
        last, epoch = f"{base}/{PL}/{LAST}", f"{base}/{PL}/{EPOCH}"
        io.save_checkpoint({"state_dict": _state(1)}, last)
        io.save_checkpoint({"state_dict": _state(0)}, epoch)
        io.wait()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(
                _state(5), storage_writer=FileSystemWriter(str(source / "step-100")), no_dist=True
            )
        (source / "notes-1.pt").write_bytes(b"plain file")
        mirror = Mirror(source, f"{base}/{MIRROR}", settle_s=0.0, delete=True, **opts)
        mirror.sync_once()

        ours = [
            store.get(o.key)
            for o in store.list(f"{CK}/")
            if is_own_key(o.key) and not o.key.endswith("/manifest.json")
        ]
        planted = _plan(store, drawn, ours, own_names=False)
        plant(store, planted)
        local = open_store(str(fast))
        planted_local = _plan(local, drawn_local, ours, own_names=True)
        plant(local, planted_local)

        # Every deleting entry point.
        first.save(3, _state(3))  # the local tier trims its own copies
        first.close()
        collect_garbage(ck_store, grace_s=0)
        collect_garbage(ck_store, grace_s=0, keep_last=2)
        with Checkpointer(
            f"{base}/{CK}", keep_last=2, incremental=True, local_copy=fast, **opts
        ) as ck:
            ck.save(4, _state(4)).wait()  # retention
            ck.gc(grace_s=0)
        for root in (base, f"{base}/{SINGLE}", f"{base}/{MIRROR}"):
            collect_garbage(open_store(root, **opts), grace_s=0)
        for generation in (2, 3):  # overwrites
            io.save_checkpoint({"state_dict": _state(generation)}, last)
        io.remove_checkpoint(epoch)
        io.wait()
        (source / "notes-1.pt").unlink()
        assert mirror.sync_once().deleted == ["notes-1.pt"]
        mirror.close()

        assert missing_or_changed(store, planted) == []
        assert missing_or_changed(local, planted_local) == []
        with Checkpointer(f"{base}/{CK}", **opts) as ck:
            assert ck.steps() == [3, 4]
            for step in (3, 4):
                out = {**_state(0), "step": -1}
                ck.load(out, step=step)
                assert _same(out, _state(step))
                assert verify_checkpoint(ck_store, Layout(step_name(step))).ok
        assert _same(shardckpt.load(f"{base}/{SINGLE}", **opts), _state(9))
        assert verify_checkpoint(open_store(f"{base}/{SINGLE}", **opts), Layout("")).ok
        assert _same(io.load_checkpoint(last)["state_dict"], _state(3))
        assert verify_checkpoint(open_store(f"{base}/{PL}", **opts), Layout(LAST)).ok
        assert not io.exists(epoch)
        io.teardown()
        mirrored = {f"step-100/{p.name}": p.read_bytes() for p in (source / "step-100").iterdir()}
        assert missing_or_changed(open_store(f"{base}/{MIRROR}", **opts), mirrored) == []

    example()
