"""Every CLI command against a real S3 server (moto) and the local store."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import shardckpt
from shardckpt import Checkpointer
from shardckpt.cli.main import build_parser, main
from shardckpt.store import open_store
from tests.cli.run import endpoint_args
from tests.conftest import Target, make_target
from tests.store.silent_server import silent_server


@pytest.fixture(params=["local", "moto-boto3"])
def root(request: pytest.FixtureRequest, tmp_path) -> Target:  # type: ignore[no-untyped-def]
    target = make_target(request.param, request, tmp_path)
    with Checkpointer(target.uri, **target.options) as ck:
        for step in (10, 20, 30):
            ck.save(step, {"w": torch.full((256, 4), float(step)), "meta": {"step": step}})
    return target


def test_ls_lists_committed_and_with_all_the_incomplete(
    root: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    open_store(root.uri, **root.options).put("step-0000000040/attempt-x/rank0-000000", [b"partial"])
    assert main(["ls", root.uri, "--json", *endpoint_args(root)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [10, 20, 30] and {r["status"] for r in rows} == {
        "committed"
    }
    assert all(r["world_size"] == 1 and r["objects"] == 1 for r in rows)  # the manifest's
    assert main(["ls", root.uri, "--all", *endpoint_args(root)]) == 0
    out = capsys.readouterr().out
    assert "incomplete" in out and "step-0000000040" in out


def test_inspect_shows_keys_shapes_dtypes(root: Target, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", root.uri, "--step", "20", *endpoint_args(root)]) == 0
    out = capsys.readouterr().out
    assert (
        "step-0000000020" in out and "float32" in out and "[256, 4]" in out and "meta.step" in out
    )


def test_verify_passes_then_finds_a_flipped_byte(
    root: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", root.uri, *endpoint_args(root)]) == 0
    assert "OK" in capsys.readouterr().out
    store = open_store(root.uri, **root.options)
    key = next(o.key for o in store.list("step-0000000030/") if "rank0" in o.key)
    data = bytearray(store.get(key))
    data[100] ^= 0xFF
    store.put(key, [bytes(data)])
    assert main(["verify", root.uri, *endpoint_args(root)]) == 1
    assert f"DAMAGED {store.uri(key)}" in capsys.readouterr().out


def test_gc_dry_run_then_keep_last(root: Target, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gc", root.uri, "--keep-last", "1", "--dry-run", *endpoint_args(root)]) == 0
    assert "would delete checkpoint" in capsys.readouterr().out
    assert Checkpointer(root.uri, **root.options).steps() == [10, 20, 30]
    assert main(["gc", root.uri, "--keep-last", "1", "--grace", "0s", *endpoint_args(root)]) == 0
    assert Checkpointer(root.uri, **root.options).steps() == [30]


def test_export_to_torch_save_and_safetensors(
    root: Target, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "model.pt")
    assert main(["export", root.uri, out, *endpoint_args(root)]) == 0
    state = torch.load(out, weights_only=True)
    assert torch.equal(state["w"], torch.full((256, 4), 30.0)) and state["meta"] == {"step": 30}
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    st = str(tmp_path / "model.safetensors")
    assert main(["export", root.uri, st, "--step", "10", *endpoint_args(root)]) == 0
    assert torch.equal(load_file(st)["w"], torch.full((256, 4), 10.0))


def test_cp_copies_committed_checkpoints_manifest_last(
    root: Target, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    dst = str(tmp_path / "copy")
    assert main(["cp", root.uri, dst, *endpoint_args(root)]) == 0
    with Checkpointer(dst) as ck:
        assert ck.steps() == [10, 20, 30]
        out = {"w": torch.zeros(256, 4), "meta": {"step": 0}}
        ck.load(out, step=20)
        assert torch.equal(out["w"], torch.full((256, 4), 20.0))
    assert main(["cp", root.uri, dst, *endpoint_args(root)]) == 1  # exists: refused
    assert "already exists" in capsys.readouterr().err


def test_cp_checks_every_object_and_commits_nothing_damaged(
    root: Target, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    store = open_store(root.uri, **root.options)
    key = next(o.key for o in store.list("step-0000000020/") if "rank0" in o.key)
    data = bytearray(store.get(key))
    data[100] ^= 0xFF  # same size, other bytes
    store.put(key, [bytes(data)])
    dst = str(tmp_path / "copy")
    assert main(["cp", root.uri, dst, *endpoint_args(root)]) == 1
    err = capsys.readouterr().err
    assert store.uri(key) in err and "does not match its manifest" in err and "CRC32C" in err
    assert not os.path.exists(os.path.join(dst, "step-0000000020", "manifest.json"))
    with Checkpointer(dst) as ck:
        assert 20 not in ck.steps()


def test_errors_exit_1_with_the_uri(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    missing = str(tmp_path / "nothing")
    assert main(["inspect", missing]) == 1
    assert missing in capsys.readouterr().err
    assert main(["ls", "gs://bucket/x"]) == 1
    assert "unknown URI scheme" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["gc", missing, "--grace", "soon"])
    assert info.value.code == 2


def test_single_file_api_roundtrip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    obj = {"model": {"w": torch.randn(5, 5)}, "epoch": 4}
    shardckpt.save(obj, tmp_path / "a")
    back = shardckpt.load(tmp_path / "a", map_location="cpu")
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and back["epoch"] == 4
    shardckpt.save(torch.arange(7), str(tmp_path / "b"))
    assert torch.equal(shardckpt.load(str(tmp_path / "b")), torch.arange(7))
    assert os.path.exists(tmp_path / "b" / "manifest.json")


def test_mirror_once_uploads_a_finished_file(
    request: pytest.FixtureRequest, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    target = make_target("moto-boto3", request, tmp_path)
    local = tmp_path / "ckpts"
    local.mkdir()
    torch.save({"w": torch.arange(5)}, local / "epoch1.pt")
    time.sleep(0.05)
    assert (
        main(["mirror", str(local), target.uri, "--once", "--settle", "0s", *endpoint_args(target)])
        == 0
    )
    store = open_store(target.uri, **target.options)
    assert store.get("epoch1.pt") == (local / "epoch1.pt").read_bytes()


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardckpt: error: "), err
    return lines[0]


@pytest.mark.parametrize("transport", ["boto3", "crt"])
def test_newcomer_mistakes_get_one_error_line(
    moto,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    transport: str,
) -> None:  # type: ignore[no-untyped-def]
    """Each of these printed a raw traceback (ValueError, ProfileNotFound, RuntimeError)."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    uri, plain = "s3://bucket/ckpt", ["--transport", transport]
    assert main(["ls", uri, "--endpoint", "127.0.0.1:9000", *plain]) == 1
    assert "'127.0.0.1:9000' (from endpoint) has no scheme: use http://127.0.0.1:9000" in (
        _one_error_line(capsys.readouterr().err)
    )
    assert main(["ls", uri, "--endpoint", moto.endpoint, "--profile", "nosuch", *plain]) == 1
    assert "AWS profile 'nosuch' is not configured" in _one_error_line(capsys.readouterr().err)
    ckpt = str(tmp_path / "ckpt")
    shardckpt.save({"w": torch.arange(4)}, ckpt)
    for out in ("model.pt", "model.safetensors"):
        missing = str(tmp_path / "no" / "such" / out)
        assert main(["export", ckpt, missing, *plain]) == 1
        line = _one_error_line(capsys.readouterr().err)
        assert (
            f"cannot write {missing}: the directory {tmp_path / 'no' / 'such'} does not exist"
            in line
        )
        assert not os.path.exists(tmp_path / "no")


def test_https_to_a_plain_http_server_is_one_error_line(
    moto, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    endpoint = moto.endpoint.replace("http://", "https://")
    assert main(["ls", "s3://bucket/ckpt", "--endpoint", endpoint]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot reach the S3 endpoint {endpoint}: the TLS handshake failed" in line


def test_a_server_that_never_answers_fails_within_the_timeout_and_says_it_retries(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert build_parser().parse_args(["ls", "s3://b/x"]).timeout == 30.0  # the default
    with silent_server() as endpoint:
        start = time.monotonic()
        assert main(["ls", "s3://bucket/ckpt", "--endpoint", endpoint, "--timeout", "1.5s"]) == 1
        assert time.monotonic() - start < 1.5 + 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(
        "shardckpt: warning: HEAD s3://bucket/ckpt/manifest.json: attempt 2 failed"
    )
    assert "ReadTimeoutError" in err[0] and "retrying" in err[0]
    assert err[1].startswith("shardckpt: error: HEAD s3://bucket/ckpt/manifest.json: gave up after")


def test_mirror_gives_up_within_the_timeout(
    moto, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """``mirror`` took ``--timeout`` and ignored it: a silent server held it for 5 minutes.
    (``moto`` for its credentials: the silent server, not their absence, is what fails.)"""
    local = tmp_path / "ckpts"
    local.mkdir()
    with silent_server() as endpoint:
        start = time.monotonic()
        argv = ["mirror", str(local), "s3://bucket/run", "--once", "--endpoint", endpoint]
        assert main([*argv, "--timeout", "1.5s"]) == 1
        assert time.monotonic() - start < 1.5 + 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("shardckpt: error: ") and "gave up after" in err[-1], err
