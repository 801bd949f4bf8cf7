"""The local S3 servers the tests and benchmarks start: SeaweedFS checks credentials, and a
stopped server leaves nothing behind (its process, data folder and the sockets it puts in
/tmp)."""

from __future__ import annotations

import os

import pytest

from shardckpt.errors import AccessDeniedError
from shardckpt.store import RetryPolicy, open_store
from shardckpt.testing.servers import LocalS3Server, start_seaweedfs


def test_seaweedfs_refuses_wrong_credentials(
    seaweedfs: LocalS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    seaweedfs.create_bucket("creds")
    store = open_store("s3://creds/root", endpoint=seaweedfs.endpoint)
    store.put("ok", [b"x"])
    store.close()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(
        "s3://creds/root", endpoint=seaweedfs.endpoint, retry=RetryPolicy(max_attempts=1)
    )
    try:
        for operation in (lambda: store.put("no", [b"x"]), lambda: store.get("ok")):
            with pytest.raises(AccessDeniedError, match="s3://creds/root"):
                operation()
    finally:
        store.close()


def test_seaweedfs_stops_and_leaves_nothing_behind() -> None:
    server = start_seaweedfs()
    try:
        server.create_bucket("left")
        store = open_store("s3://left/root", endpoint=server.endpoint)
        store.put("obj", [b"data"])
        store.close()
        assert server.data_dir is not None and os.path.isdir(server.data_dir)
        assert server.sockets and any(os.path.exists(s) for s in server.sockets)
    finally:
        server.stop()
    assert server.proc.returncode is not None
    assert not os.path.exists(server.data_dir)
    assert [s for s in server.sockets if os.path.exists(s)] == []
