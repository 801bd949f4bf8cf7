"""Test infrastructure: real S3 servers on loopback, started once per session.

``target`` is parametrized over every backend/transport/server combination; tests that need
conditional writes or CRT uploads skip the combinations that lack them, with a reason.
SeaweedFS is the one local server that honours conditional writes, checks credentials and
checks the ``x-amz-checksum-crc32c`` of every upload.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from shardckpt.store import ObjectStore, open_store
from shardckpt.testing.servers import LocalS3Server, start_moto, start_rclone, start_seaweedfs


@pytest.fixture(scope="session")
def moto() -> Iterator[LocalS3Server]:
    with start_moto() as server:
        os.environ.update(server.env)
        yield server


@pytest.fixture(scope="session")
def rclone() -> Iterator[LocalS3Server]:
    with start_rclone() as server:
        os.environ.update(server.env)
        yield server


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[LocalS3Server]:
    with start_seaweedfs() as server:
        os.environ.update(server.env)
        yield server


@dataclass
class Target:
    """Where a test writes: ``uri`` plus the ``options`` to open it with."""

    name: str
    uri: str
    options: dict[str, object]
    conditional_put: bool = True
    crt_upload: bool = True
    checks_crc32c: bool = False  # the server refuses an upload whose CRC32C header is wrong
    lists_in_key_order: bool = True  # S3's order; SeaweedFS lists by path component

    def open(self) -> ObjectStore:
        return open_store(self.uri, **self.options)


TARGETS = ["local", "moto-boto3", "moto-crt", "rclone-boto3", "seaweedfs-boto3", "seaweedfs-crt"]


def make_target(name: str, request: pytest.FixtureRequest, tmp_path) -> Target:  # type: ignore[no-untyped-def]
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    if name == "local":
        return Target(name, str(tmp_path / "store"), {})
    server_name, transport = name.split("-")
    server: LocalS3Server = request.getfixturevalue(server_name)
    server.create_bucket(bucket)
    options: dict[str, object] = {"endpoint": server.endpoint, "transport": transport}
    if server_name == "rclone":  # it ignores If-None-Match: commits are refused without this
        options["unsafe_unconditional_commit"] = True
    return Target(
        name,
        f"s3://{bucket}/root",
        options,
        conditional_put=server_name != "rclone",
        crt_upload=server_name != "rclone",
        checks_crc32c=server_name == "seaweedfs" and transport == "boto3",  # the CRT sends none
        lists_in_key_order=server_name != "seaweedfs",
    )


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest, tmp_path) -> Target:  # type: ignore[no-untyped-def]
    return make_target(request.param, request, tmp_path)


@pytest.fixture
def open_with(target: Target) -> Iterator[Callable[..., ObjectStore]]:
    """Open ``target`` with extra options (ignored by the local store); closed afterwards."""
    opened: list[ObjectStore] = []

    def _open(**extra: object) -> ObjectStore:
        store = open_store(target.uri, **{**target.options, **extra})
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


@pytest.fixture
def store(target: Target) -> Iterator[ObjectStore]:
    s = target.open()
    yield s
    s.close()
