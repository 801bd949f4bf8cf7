"""ShardckptCheckpointIO in real Lightning training on the CPU, against moto: checkpoints
commit in the background, resume restores training bit-exact, removal and failures."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shardckpt import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidURIError,
    ManifestError,
    SaveFailedError,
)
from shardckpt.integrations.lightning import ShardckptCheckpointIO, ShardckptModelCheckpoint
from shardckpt.store import open_store
from tests.conftest import Target, make_target


class Net(L.LightningModule):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)]


class Opaque:
    """A value torch's weights_only loader refuses."""

    def __init__(self, value: int) -> None:
        self.value = value


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    # 40 samples, batches of 8: epochs end at steps 5, 10, ... (where checkpoints are taken)
    return DataLoader(
        TensorDataset(torch.randn(40, 16, generator=g), torch.randn(40, 1, generator=g)),
        batch_size=8,
    )


def _trainer(
    io: ShardckptCheckpointIO, root: Path, steps: int, callbacks: list[Any] | None = None
) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=callbacks is not None,
        default_root_dir=str(root),
        plugins=[io],
        callbacks=callbacks or [],
    )


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    return make_target("moto-boto3", request, tmp_path)


def test_fit_commits_in_background_and_resume_is_bit_exact(s3: Target, tmp_path: Path) -> None:
    dirpath = f"{s3.uri}/run"
    reference = _net(0)  # 12 uninterrupted steps
    _trainer(ShardckptCheckpointIO(**s3.options), tmp_path, 12).fit(reference, _data())

    io = ShardckptCheckpointIO(**s3.options)
    first = _net(0)
    callback = ShardckptModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_last=True)
    _trainer(io, tmp_path, 10, [callback]).fit(first, _data())

    # top-1 + last at steps 5 and 10; each returned after the snapshot, committed later
    assert [Path(h.uri).name for h in io.history] == [
        "epoch=0-step=5.ckpt",
        "last.ckpt",
        "epoch=1-step=10.ckpt",
        "last.ckpt",
    ]
    assert all(h.total_s is not None and h.blocked_s < h.total_s for h in io.history)
    # Lightning removed the older top-1 checkpoint: manifest and data
    assert io.checkpoints(dirpath) == [f"{dirpath}/epoch=1-step=10.ckpt", f"{dirpath}/last.ckpt"]
    store = open_store(dirpath, **s3.options)
    assert not list(store.list("epoch=0-step=5.ckpt/"))
    # last.ckpt was written twice: the replaced attempt's data stays for one more generation
    assert (
        len(
            {
                o.key.split("/")[1]
                for o in store.list("last.ckpt/")
                if o.key != "last.ckpt/manifest.json"
            }
        )
        == 2
    )

    loaded = io.load_checkpoint(f"{dirpath}/epoch=1-step=10.ckpt")
    assert loaded["global_step"] == 10 and loaded["hyper_parameters"] == {"width": 64}
    assert isinstance(loaded["state_dict"], OrderedDict) and _same(
        loaded["state_dict"], first.state_dict()
    )
    assert set(loaded["optimizer_states"][0]["state"]) == {0, 1, 2, 3}

    # resume from the newest commit and train on: the same as never stopping
    resume = ShardckptCheckpointIO(**s3.options)
    latest = resume.latest(dirpath)
    assert latest == f"{dirpath}/last.ckpt"
    second = _net(1)
    trainer = _trainer(
        resume, tmp_path, 12, [ShardckptModelCheckpoint(dirpath=dirpath, every_n_train_steps=5)]
    )
    trainer.fit(second, _data(), ckpt_path=latest)
    assert trainer.global_step == 12
    assert _same(second.state_dict(), reference.state_dict())

    callback.to_yaml()  # side files go through the plugin's store too
    assert store.head("best_k_models.yaml") is not None

    # Lightning resolves ckpt_path="last" through fsspec; for s3:// it is refused clearly
    third = _trainer(
        ShardckptCheckpointIO(**s3.options),
        tmp_path,
        12,
        [ShardckptModelCheckpoint(dirpath=dirpath)],
    )
    with pytest.raises(CheckpointError, match="io.latest"):
        third.fit(_net(2), _data(), ckpt_path="last")


def test_save_returns_after_the_snapshot(s3: Target) -> None:
    io = ShardckptCheckpointIO(**s3.options)
    weights = torch.randn(2048, 1024)  # 8 MiB: the upload takes far longer than the copy
    checkpoint = {"global_step": 3, "state_dict": {"w": weights, "b": torch.arange(5)}}
    expected = weights.clone()
    path = f"{s3.uri}/run/epoch=0-step=3.ckpt"
    probe = open_store(f"{s3.uri}/run", **s3.options)

    io.save_checkpoint(checkpoint, path)
    save = io.last_save
    assert save is not None and not save.done()
    assert probe.head("epoch=0-step=3.ckpt/manifest.json") is None  # not committed yet
    weights.add_(1.0)  # training goes on; the snapshot is unaffected
    io.wait()
    assert save.done() and save.total_s is not None and save.blocked_s < save.total_s
    assert probe.head("epoch=0-step=3.ckpt/manifest.json") is not None
    assert io.exists(path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], expected)

    io.remove_checkpoint(path)
    io.wait()
    assert not io.exists(path) and not list(probe.list("epoch=0-step=3.ckpt/"))
    io.teardown()


def test_background_failure_surfaces_once_and_keeps_the_previous_checkpoint(s3: Target) -> None:
    io = ShardckptCheckpointIO(**s3.options)
    good = f"{s3.uri}/run/good.ckpt"
    missing = "s3://shardckpt-no-such-bucket/run/x.ckpt"
    checkpoint = {"state_dict": {"w": torch.ones(4)}}
    io.save_checkpoint(checkpoint, good)
    io.save_checkpoint(checkpoint, missing)  # returns: only the snapshot runs here
    with pytest.raises(SaveFailedError, match="shardckpt-no-such-bucket") as info:
        io.remove_checkpoint(good)  # as Lightning does after a new save
        io.wait()
    assert "BucketNotFoundError" in str(info.value)
    assert io.exists(good)  # a failed save never removes the checkpoint before it
    io.wait()  # raised once
    io.save_checkpoint(checkpoint, missing)
    with pytest.raises(SaveFailedError):
        io.teardown()


def test_local_dirpath_with_lightnings_own_model_checkpoint(tmp_path: Path) -> None:
    io = ShardckptCheckpointIO()
    model = _net(0)
    callback = ModelCheckpoint(every_n_train_steps=5, save_last=True)
    _trainer(io, tmp_path, 10, [callback]).fit(model, _data())
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == [
        "epoch=1-step=10.ckpt",
        "last.ckpt",
    ]  # step 5 removed
    assert (checkpoints / "last.ckpt" / "manifest.json").is_file()

    restored = _net(1)
    trainer = _trainer(
        ShardckptCheckpointIO(),
        tmp_path,
        10,
        [ModelCheckpoint(every_n_train_steps=5, save_last=True)],
    )
    trainer.fit(restored, _data(), ckpt_path="last")  # Lightning finds last.ckpt itself
    assert trainer.global_step == 10 and _same(restored.state_dict(), model.state_dict())

    # a failure of the background upload fails fit (here: the directory cannot be created)
    (tmp_path / "blocker").write_text("a file where a directory should be")
    failing = ModelCheckpoint(dirpath=tmp_path / "blocker" / "ckpts", every_n_train_steps=2)
    with pytest.raises(SaveFailedError, match="blocker"):
        _trainer(ShardckptCheckpointIO(), tmp_path, 6, [failing]).fit(_net(0), _data())


def test_weights_only_policy(s3: Target) -> None:
    io = ShardckptCheckpointIO(**s3.options)
    path = f"{s3.uri}/run/custom.ckpt"
    io.save_checkpoint(
        {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"obj": Opaque(7)}}, path
    )
    with pytest.raises(ManifestError, match="weights_only=False"):
        io.load_checkpoint(path)
    assert io.load_checkpoint(path, weights_only=False)["hyper_parameters"]["obj"].value == 7
    assert (
        ShardckptCheckpointIO(trusted=True, **s3.options)
        .load_checkpoint(path)["hyper_parameters"]["obj"]
        .value
        == 7
    )
    with pytest.raises(InvalidURIError):
        io.save_checkpoint({}, "s3://bucket-only")
    with pytest.raises(CheckpointNotFoundError):
        io.load_checkpoint(f"{s3.uri}/run/never-saved.ckpt")
    assert io.latest(f"{s3.uri}/empty") is None
