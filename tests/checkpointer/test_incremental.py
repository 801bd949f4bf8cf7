"""Incremental saves: frozen bytes are uploaded once, every checkpoint stays loadable alone
whatever retention deletes, and a gc that crashes midway leaves every remaining checkpoint
loadable. And shared loads: replicated state fetched once per job."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from shardckpt import Checkpointer, ManifestError, ShardReader
from shardckpt.cli.main import main
from shardckpt.format.catalog import step_name
from shardckpt.format.layout import Layout
from shardckpt.format.manifest import read_manifest
from shardckpt.retention.garbage import collect_garbage, retire_checkpoints
from shardckpt.store import RetryPolicy, open_store
from shardckpt.tools.verify import verify_checkpoint
from tests.distributed import run_ranks
from tests.manifest.edit import rewrite_manifest
from tests.reliability.fault_proxy import FaultProxy, Rule, on

MiB = 1 << 20
FROZEN = {
    f"frozen.{i}": torch.randn(MiB // 4, generator=torch.Generator().manual_seed(i))
    for i in range(9)
}


def _state(step: int) -> dict[str, Any]:
    """90% frozen (nine 1 MiB tensors), 10% trained (one tensor that changes every step)."""
    head = torch.randn(MiB // 4, generator=torch.Generator().manual_seed(1000 + step))
    return {"model": {**FROZEN, "head": head}, "step": step}


def _assert_loads(ck: Checkpointer, step: int) -> None:
    out = _state(-1)
    ck.load(out, step=step)
    want = _state(step)
    assert out["step"] == step
    assert all(torch.equal(out["model"][k], v) for k, v in want["model"].items())


def _save_five(root: str, options: dict[str, Any], incremental: bool) -> int:
    with Checkpointer(root, incremental=incremental, **options) as ck:
        for step in range(1, 6):
            ck.save(step, _state(step)).wait()
        assert [s.reused_bytes for s in ck.history] == (
            [0] + [9 * MiB] * 4 if incremental else [0] * 5
        )
        return ck.store.stats.bytes_put


def test_frozen_bytes_are_uploaded_once(target) -> None:  # type: ignore[no-untyped-def]
    incremental = _save_five(f"{target.uri}/inc", target.options, True)
    full = _save_five(f"{target.uri}/full", target.options, False)
    # 10 MiB once, then 1 MiB per save, plus manifests; against 5 x 10 MiB.
    assert 14 * MiB < incremental < 14.2 * MiB
    assert 50 * MiB < full < 50.2 * MiB


def test_every_checkpoint_loads_alone_after_retention_deletes_the_others(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = str(tmp_path / "base")
    _save_five(base, {}, True)
    for keep in range(1, 6):
        root = str(tmp_path / f"keep{keep}")
        shutil.copytree(base, root)
        store = open_store(root)
        retire_checkpoints(store, [Layout(step_name(s)) for s in range(1, 6) if s != keep])
        with Checkpointer(root) as ck:
            assert ck.steps() == [keep]
            _assert_loads(ck, keep)
        assert verify_checkpoint(store, Layout(step_name(keep))).ok
        # Only what step `keep` references is left: nothing of the others' trained heads.
        manifest = read_manifest(store, Layout(step_name(keep)))
        stored = {o.key for o in store.list("") if not o.key.endswith("manifest.json")}
        assert stored == set(Layout(step_name(keep)).object_keys(manifest.streams))


def test_keep_last_retention_keeps_what_the_newest_reuses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with Checkpointer(tmp_path / "run", incremental=True, keep_last=2) as ck:
        for step in range(1, 6):
            ck.save(step, _state(step)).wait()
        assert ck.steps() == [4, 5]
        _assert_loads(ck, 4)
        _assert_loads(ck, 5)


def test_a_gc_crashing_midway_leaves_every_remaining_checkpoint_loadable(moto, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bucket = "inc-gc"
    moto.create_bucket(bucket)
    _save_five(f"s3://{bucket}/run", {"endpoint": moto.endpoint}, True)
    with FaultProxy(moto.endpoint, seed=5) as proxy:
        # The manifests' delete goes through; the data's delete fails: a crash in between.
        deletes = on("POST", query="delete")
        proxy.set_rules([Rule("internal", match=deletes, armed_by=deletes)])
        store = open_store(
            f"s3://{bucket}/run", endpoint=proxy.endpoint, retry=RetryPolicy(max_attempts=1)
        )
        with pytest.raises(Exception, match="InternalError|internal error"):
            collect_garbage(store, grace_s=0, keep_last=2)
    direct = open_store(f"s3://{bucket}/run", endpoint=moto.endpoint)
    with Checkpointer(f"s3://{bucket}/run", endpoint=moto.endpoint) as ck:
        assert ck.steps() == [4, 5]
        _assert_loads(ck, 4)
        _assert_loads(ck, 5)
    report = collect_garbage(direct, grace_s=0)  # the next gc finishes the job
    assert report.garbage_objects  # steps 1-3's trained heads, and nothing referenced
    with Checkpointer(f"s3://{bucket}/run", endpoint=moto.endpoint) as ck:
        _assert_loads(ck, 4)
        _assert_loads(ck, 5)
    for step in (4, 5):
        assert verify_checkpoint(direct, Layout(step_name(step))).ok


def _shared_load(rank: int, world_size: int, root: str, shared: bool) -> tuple[int, bool]:
    with Checkpointer(root, shared_load=shared) as ck:
        before = ck.store.stats.bytes_got
        out = _state(-1)
        ck.load(out, step=5)
        want = _state(5)
        same = all(torch.equal(out["model"][k], v) for k, v in want["model"].items())
        return ck.store.stats.bytes_got - before, same


@pytest.mark.slow
def test_shared_load_fetches_replicated_state_once_per_job(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "run")
    _save_five(root, {}, True)  # step 5 reuses step 1's frozen bytes: two homes
    alone = run_ranks(_shared_load, 2, root, False)
    shared = run_ranks(_shared_load, 2, root, True)
    assert all(same for _, same in alone + shared)
    assert all(got >= 10 * MiB for got, _ in alone)
    assert 10 * MiB <= sum(got for got, _ in shared) < 10.5 * MiB
    assert min(got for got, _ in shared) > 2 * MiB


def test_a_plain_reader_finds_reused_data_through_the_parent(target) -> None:  # type: ignore[no-untyped-def]
    root = f"{target.uri}/run"
    _save_five(root, target.options, True)
    out = _state(-1)
    dcp.load(
        out, storage_reader=ShardReader(f"{root}/{step_name(5)}", **target.options), no_dist=True
    )
    assert out["step"] == 5 and all(torch.equal(out["model"][k], v) for k, v in FROZEN.items())


def test_cli_verifies_an_incremental_root_and_names_the_fix_for_one_step(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "run")
    _save_five(root, {}, True)
    assert main(["verify", root]) == 0
    assert main(["verify", f"{root}/{step_name(5)}"]) != 0
    assert "give its parent" in capsys.readouterr().err


def _equal_bytes_state(step: int) -> dict[str, Any]:
    """Items with equal bytes, as real training has them: a model and its AdamW state (every
    parameter's ``step`` tensor is the same scalar), tied and zero-initialised tensors, and a
    nested value that differs per step."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    for _ in range(step):
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
    return {
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "a": torch.ones(4),
        "b": torch.ones(4),
        "zeros": [torch.zeros(16), torch.zeros(16)],
        "extra": {"step": step, "name": "run"},
    }


def _blank(value: Any) -> Any:
    """The same structure with every tensor and value changed: what a load must overwrite."""
    if isinstance(value, torch.Tensor):
        return torch.full_like(value, 3)
    if isinstance(value, dict):
        return {k: _blank(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v) for v in value]
    return None if isinstance(value, str) else value


def _assert_same(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert {str(k) for k in got} == {str(k) for k in want}
        by_name = {str(k): v for k, v in got.items()}
        for k, v in want.items():
            _assert_same(by_name[str(k)], v)
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _assert_same(g, w)
    else:
        assert got == want


def _cli_options(target) -> list[str]:  # type: ignore[no-untyped-def]
    return [x for k, v in target.options.items() for x in (f"--{k}", str(v))]


@pytest.mark.parametrize("target", ["local", "moto-boto3"], indirect=True)
def test_equal_bytes_items_saved_twice_load_verify_and_export(target, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, item 1: two items with the very same bytes in an incremental save share one
    place; the checkpoint loads bit-exact, verifies and exports (it used to be refused as
    'overlapping items' while verify said OK)."""
    root = f"{target.uri}/equal"
    with Checkpointer(root, incremental=True, **target.options) as ck:
        ck.save(1, _equal_bytes_state(1)).wait()
        ck.save(2, _equal_bytes_state(2)).wait()
        assert ck.history[1].reused_bytes > 0
        manifest = read_manifest(ck.store, Layout(step_name(2)))
        places = [(s, o, n) for t in manifest.items for _, _, s, o, n, _, _ in t.rows()]
        assert len(set(places)) < len(places)  # equal bytes: one place, several items
        for step in (1, 2):
            out = _blank(_equal_bytes_state(step))
            ck.load(out, step=step)
            _assert_same(out, _equal_bytes_state(step))
        assert verify_checkpoint(ck.store, Layout(step_name(2))).ok
    assert main(["verify", root, *_cli_options(target)]) == 0
    out = str(tmp_path / "export.pt")
    assert main(["export", root, out, *_cli_options(target)]) == 0
    exported = torch.load(out)
    want = _equal_bytes_state(2)
    _assert_same(exported["model"], want["model"])
    _assert_same(exported["zeros"], want["zeros"])
    _assert_same(exported["optim"]["state"], want["optim"]["state"])


@pytest.mark.parametrize("target", ["local", "moto-boto3"], indirect=True)
def test_a_partial_overlap_is_refused_by_load_verify_and_export(target, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Items sharing only part of their bytes are not something a writer makes: load, verify
    and export refuse the manifest naming the field, before fetching any data."""
    root = f"{target.uri}/overlap"
    with Checkpointer(root, incremental=True, **target.options) as ck:
        ck.save(1, {"a": torch.arange(4.0), "b": torch.arange(4.0) + 4}).wait()
        ck.save(2, {"a": torch.arange(4.0), "b": torch.arange(4.0) + 4}).wait()
        key = Layout(step_name(2)).manifest_key

        def overlap(doc: dict[str, Any]) -> None:
            doc["items"][0]["offset"][1] = doc["items"][0]["offset"][0] + 8  # half of a's bytes

        rewrite_manifest(ck.store, key, overlap)
        before = ck.store.stats.bytes_got
        with pytest.raises(ManifestError, match=r"items\[0\]\.offset\[.\].*overlaps") as load:
            ck.load({"a": torch.zeros(4), "b": torch.zeros(4)}, step=2)
        assert ck.store.uri(key) in str(load.value)
        with pytest.raises(ManifestError) as verify:
            verify_checkpoint(ck.store, Layout(step_name(2)))
        assert str(verify.value) == str(load.value)
        assert ck.store.stats.bytes_got - before < 4096  # the manifests only
    capsys.readouterr()
    assert main(["verify", root, *_cli_options(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("shardckpt: error: ") and "overlaps" in err and err.count("\n") == 1
    assert main(["export", root, str(tmp_path / "x.pt"), *_cli_options(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("shardckpt: error: ") and "overlaps" in err and err.count("\n") == 1
