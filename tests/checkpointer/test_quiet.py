"""A one-process save or load through shardckpt prints none of torch's "torch.distributed is
disabled" warnings (the one process is ours to choose), while a user's own ``dcp.save`` /
``dcp.load`` without a process group keeps torch's word on it. Local store and moto."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import shardckpt
from shardckpt import Checkpointer, ShardReader, ShardWriter
from shardckpt.cli.main import main
from shardckpt.integrations.lightning import ShardckptCheckpointIO
from tests.conftest import Target, make_target

SINGLE_PROCESS = "torch.distributed is disabled"


@pytest.fixture(params=["local", "moto-boto3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    return make_target(request.param, request, tmp_path)


def _torch_single_process(recwarn: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in recwarn if SINGLE_PROCESS in str(w.message)]


def test_save_load_and_export(
    where: Target, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    uri = f"{where.uri}/model"
    shardckpt.save({"w": torch.arange(6.0), "epoch": 3}, uri, **where.options)
    assert shardckpt.load(uri, **where.options)["epoch"] == 3
    endpoint = where.options.get("endpoint")
    out = str(tmp_path / "model.pt")
    assert main(["export", uri, out, *(["--endpoint", str(endpoint)] if endpoint else [])]) == 0
    assert torch.load(out)["epoch"] == 3
    assert _torch_single_process(recwarn) == []


def test_checkpointer_without_a_process_group(
    where: Target, recwarn: pytest.WarningsRecorder
) -> None:
    with Checkpointer(where.uri, **where.options) as ckpt:
        ckpt.save(1, {"w": torch.ones(4)}).wait()
        state = {"w": torch.zeros(4)}
        assert ckpt.load(state) == 1
    assert torch.equal(state["w"], torch.ones(4))
    assert _torch_single_process(recwarn) == []


def test_lightning_plugin(where: Target, recwarn: pytest.WarningsRecorder) -> None:
    io = ShardckptCheckpointIO(**where.options)
    path = f"{where.uri}/run/last.ckpt"
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(3)}}, path)
    io.wait()
    assert io.load_checkpoint(path)["global_step"] == 2
    io.teardown()
    assert _torch_single_process(recwarn) == []


def test_a_users_own_dcp_call_keeps_torchs_warning_and_ours_leave_no_filter(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """dcp.save / dcp.load are the user's calls: torch's warning about them stays."""
    filters = list(warnings.filters)
    shardckpt.save({"w": torch.ones(2)}, tmp_path / "ours")
    assert warnings.filters == filters
    dcp.save({"w": torch.ones(2)}, storage_writer=ShardWriter(tmp_path / "theirs"))
    dcp.load({"w": torch.zeros(2)}, storage_reader=ShardReader(tmp_path / "theirs"))
    assert [m.split(",")[0] for m in _torch_single_process(recwarn)] == [SINGLE_PROCESS] * 2
