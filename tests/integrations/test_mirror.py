"""Mirror mode against moto: plain files after they settle, DCP directories with `.metadata`
last, no re-uploads of unchanged files, deletes, the background thread and the CLI."""

from __future__ import annotations

import argparse
import io
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from shardckpt._util.duration import duration
from shardckpt.cli.mirror import add_mirror_command
from shardckpt.cli.options import common_parser
from shardckpt.store import ObjectStore, open_store
from shardckpt.store.base import Buffer
from shardckpt.store.s3_boto import BotoS3Store
from shardckpt.store.s3_config import S3Config
from shardckpt.tools.mirror import Mirror
from shardckpt.uri import parse_uri
from tests.conftest import Target, make_target


class LoggingStore(BotoS3Store):
    """The real boto3 store, recording when each put starts and ends and each delete."""

    def __init__(self, bucket: str, prefix: str, config: S3Config) -> None:
        super().__init__(bucket, prefix, config)
        self.log: list[tuple[str, str]] = []
        self._log_lock = threading.Lock()

    def _record(self, event: str, key: str) -> None:
        with self._log_lock:
            self.log.append((event, key))

    def put(self, key: str, data: Sequence[Buffer], *, if_absent: bool = False) -> None:
        self._record("put-start", key)
        super().put(key, data, if_absent=if_absent)
        self._record("put-end", key)

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._record("delete", key)
        super().delete(keys)

    def puts(self) -> list[str]:
        return [k for e, k in self.log if e == "put-end"]


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    return make_target("moto-boto3", request, tmp_path)


@pytest.fixture
def store(s3: Target) -> LoggingStore:
    location = parse_uri(s3.uri)
    return LoggingStore(
        location.bucket, location.prefix, S3Config(endpoint=str(s3.options["endpoint"]))
    )


def _keys(store: ObjectStore, prefix: str = "") -> list[str]:
    return [o.key for o in store.list(prefix)]


def _local(tmp_path: Path) -> Path:
    path = tmp_path / "local"
    path.mkdir()
    return path


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randn(32, generator=g),
        "step": torch.tensor(seed),
    }


def _dcp_save(state: dict[str, torch.Tensor], directory: Path) -> None:
    dcp.save(state, storage_writer=FileSystemWriter(str(directory)), no_dist=True)


def test_torch_save_file_mirrored_once_it_settles_and_only_when_changed(
    tmp_path: Path, store: LoggingStore
) -> None:
    local = _local(tmp_path)
    torch.save(_state(1), local / "model.pt")
    (local / "next.pt.tmp").write_bytes(b"the unfinished half of a write-then-rename")
    mirror = Mirror(local, store, interval=0.1, settle_s=0.3)

    report = mirror.sync_once()  # just written: not settled yet
    assert report.pending == ["model.pt"] and _keys(store) == []
    time.sleep(0.35)
    report = mirror.sync_once()
    assert report.uploaded == ["model.pt"] and _keys(store) == ["model.pt"]
    loaded = torch.load(io.BytesIO(store.get("model.pt")), weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in _state(1).items())

    assert mirror.sync_once().unchanged == 1 and store.puts() == ["model.pt"]  # unchanged: no put
    os.utime(local / "model.pt")  # new mtime, same bytes: read, CRC32C compared, not uploaded
    time.sleep(0.35)
    assert mirror.sync_once().uploaded == [] and store.puts() == ["model.pt"]
    torch.save(_state(2), local / "model.pt")  # new bytes
    time.sleep(0.35)
    assert mirror.sync_once().uploaded == ["model.pt"] and store.puts() == ["model.pt", "model.pt"]
    loaded = torch.load(io.BytesIO(store.get("model.pt")), weights_only=True)
    assert torch.equal(loaded["w"], _state(2)["w"])

    (local / "model.pt").unlink()
    assert mirror.sync_once().deleted == [] and _keys(store) == ["model.pt"]  # delete is opt-in
    mirror.delete = True
    assert mirror.sync_once().deleted == ["model.pt"] and _keys(store) == []


def test_dcp_directory_uploaded_metadata_last_and_loadable(
    tmp_path: Path, store: LoggingStore
) -> None:
    local, held = _local(tmp_path), tmp_path / "held"
    held.mkdir()
    step = local / "step-100"
    _dcp_save(_state(1), step)
    # Make it look as it does mid-save: data written, `.metadata` not yet (then being renamed in).
    (step / ".metadata").rename(held / ".metadata")
    mirror = Mirror(local, store, interval=0.1, settle_s=0.0)
    assert mirror.sync_once().pending == ["step-100"] and _keys(store) == []
    (held / ".metadata").rename(step / ".metadata.tmp")
    assert mirror.sync_once().pending == ["step-100"] and _keys(store) == []
    (step / ".metadata.tmp").rename(step / ".metadata")  # what FileSystemWriter.finish does

    report = mirror.sync_once()
    data = sorted(k for k in report.uploaded if not k.endswith("/.metadata"))
    assert data and all(k.endswith(".distcp") for k in data)
    assert sorted(report.uploaded) == sorted([*data, "step-100/.metadata"])
    marker_start = store.log.index(("put-start", "step-100/.metadata"))
    assert all(store.log.index(("put-end", k)) < marker_start for k in data)  # marker strictly last

    download = tmp_path / "download" / "step-100"
    download.mkdir(parents=True)
    for key in _keys(store, "step-100/"):
        (download / key.split("/", 1)[1]).write_bytes(store.get(key))
    restored = {k: torch.zeros_like(v) for k, v in _state(0).items()}
    dcp.load(restored, storage_reader=FileSystemReader(str(download)), no_dist=True)
    assert all(torch.equal(restored[k], v) for k, v in _state(1).items())

    puts = len(store.puts())
    assert mirror.sync_once().uploaded == [] and len(store.puts()) == puts  # nothing re-uploaded

    # Saving again into the same directory: the remote marker goes first, comes back last.
    time.sleep(0.01)
    _dcp_save(_state(2), step)
    store.log.clear()
    report = mirror.sync_once()
    assert store.log[0] == ("delete", "step-100/.metadata")
    assert store.log[-2:] == [
        ("put-start", "step-100/.metadata"),
        ("put-end", "step-100/.metadata"),
    ]
    assert "step-100/.metadata" in report.uploaded

    # Deleted locally, with delete on: `.metadata` first, then the data.
    for path in step.iterdir():
        path.unlink()
    step.rmdir()
    store.log.clear()
    mirror.delete = True
    assert sorted(mirror.sync_once().deleted) == sorted(data + ["step-100/.metadata"])
    assert store.log[0] == ("delete", "step-100/.metadata") and _keys(store) == []


def test_background_thread_and_restart_adopt_remote_copies(
    tmp_path: Path, s3: Target, store: LoggingStore
) -> None:
    local = _local(tmp_path)
    with Mirror(local, s3.uri, interval=0.05, settle_s=0.1, **s3.options) as mirror:
        torch.save(_state(3), local / "a.pt")
        (local / "sub").mkdir()
        torch.save(_state(4), local / "sub" / "b.pt")
        deadline = time.monotonic() + 10
        while _keys(store) != ["a.pt", "sub/b.pt"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _keys(store) == ["a.pt", "sub/b.pt"]
    assert mirror.last_error is None

    restarted = Mirror(local, store, interval=0.05, settle_s=0.0)
    report = restarted.sync_once()
    assert report.unchanged == 2 and store.puts() == []  # same size, newer remote: adopted


def test_cli_once(tmp_path: Path, s3: Target, capsys: pytest.CaptureFixture[str]) -> None:
    local = _local(tmp_path)
    _dcp_save(_state(5), local / "ckpt")
    parser = argparse.ArgumentParser(prog="shardckpt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_mirror_command(sub, parents=[common_parser()])
    args = parser.parse_args(
        [
            "mirror",
            str(local),
            s3.uri,
            "--once",
            "--interval",
            "500ms",
            "--endpoint",
            str(s3.options["endpoint"]),
        ]
    )
    assert args.interval == 0.5 and args.func(args) == 0
    out = capsys.readouterr().out
    assert f"uploaded {s3.uri}/ckpt/.metadata" in out and "0 pending" in out
    assert ".metadata" in [k.rsplit("/", 1)[-1] for k in _keys(open_store(s3.uri, **s3.options))]
    assert duration("2m") == 120 and duration("5") == 5
    with pytest.raises(argparse.ArgumentTypeError):
        duration("soon")

    standalone = argparse.ArgumentParser(prog="shardckpt")  # without the CLI's common options
    add_mirror_command(standalone.add_subparsers(dest="command"))
    assert standalone.parse_args(
        ["mirror", "a", "b", "--delete", "--endpoint", "http://127.0.0.1:1"]
    ).delete
