"""Checksums the server checks: an upload carries the CRC32C its caller computed over its bytes
(``x-amz-checksum-crc32c`` on PutObject; on a multipart upload, each part's own CRC32C and the
whole object's at completion), so a server that validates them refuses bytes that differ from
the ones checksummed, with one ``ChecksumMismatchError`` that is not retried.

Of the local servers only SeaweedFS checks them (as AWS does). moto and rclone accept a wrong
value and store the object; the local store has no transfer to check and ignores it, and so
does the CRT transport (which does not take the argument yet). The tests pin down each.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import torch

import shardckpt
from shardckpt._util.bytes import crc32c
from shardckpt.errors import ChecksumMismatchError
from shardckpt.store import ObjectStore, open_store
from shardckpt.testing.servers import LocalS3Server
from shardckpt.uri import parse_uri
from tests.conftest import Target, make_target
from tests.store.test_roundtrip import random_bytes

MiB = 1 << 20
# (size, store options): one PutObject, or a multipart upload of three 5 MiB parts.
UPLOADS = {
    "put": (MiB + 3, {}),
    "multipart": (11 * MiB, {"multipart_threshold": 1, "part_size": 5 * MiB}),
}


def b64(crc: int) -> str:
    """A CRC32C as S3 writes it: base64 of its 4 big-endian bytes."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def as_buffers(data: bytes) -> list[memoryview]:
    """``data`` in uneven pieces, so part boundaries fall inside buffers."""
    view = memoryview(data)
    return [view[:1000], view[1000 : 3 * MiB + 7], view[3 * MiB + 7 :]]


@pytest.mark.parametrize("upload", list(UPLOADS))
def test_the_right_crc32c_is_accepted_and_recorded(
    target: Target, open_with: Callable[..., ObjectStore], upload: str
) -> None:
    size, options = UPLOADS[upload]
    store = open_with(**options)
    data = random_bytes(size, seed=11)
    store.put("obj", as_buffers(data), crc32c=crc32c(memoryview(data)))
    assert store.get("obj") == data
    if target.checks_crc32c:  # it kept the whole object's CRC32C: ours, sent and checked
        location = parse_uri(target.uri)
        reply = boto3.client(
            "s3", endpoint_url=str(target.options["endpoint"]), region_name="us-east-1"
        ).head_object(Bucket=location.bucket, Key=f"{location.prefix}/obj", ChecksumMode="ENABLED")
        assert reply["ChecksumCRC32C"] == b64(crc32c(memoryview(data)))
        assert reply.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"


@pytest.mark.parametrize("upload", list(UPLOADS))
def test_a_wrong_crc32c_is_refused_where_the_server_checks_it(
    target: Target, open_with: Callable[..., ObjectStore], upload: str
) -> None:
    size, options = UPLOADS[upload]
    store = open_with(**options)
    data = random_bytes(size, seed=12)
    wrong = crc32c(memoryview(data)) ^ 1
    if not target.checks_crc32c:  # moto, rclone, the local store, the CRT transport
        store.put("obj", as_buffers(data), crc32c=wrong)
        assert store.get("obj") == data
        return
    with pytest.raises(ChecksumMismatchError) as info:
        store.put("obj", as_buffers(data), crc32c=wrong)
    message = str(info.value)
    assert store.uri("obj") in message and "CRC32C" in message, message
    assert store.stats.retries == 0, "a refused checksum is not a transient failure"
    assert store.head("obj") is None
    assert list(store.list_pending_uploads()) == [], "the refused multipart upload was aborted"


def test_only_our_checksum_is_sent(seaweedfs: LocalS3Server) -> None:
    """botocore adds no CRC of its own (a second pass over every byte): each PutObject and
    UploadPart carries exactly one ``x-amz-checksum-*`` header, ours."""
    seaweedfs.create_bucket("one-checksum")
    store = open_store(
        "s3://one-checksum/root",
        endpoint=seaweedfs.endpoint,
        multipart_threshold=6 * MiB,
        part_size=5 * MiB,
    )
    sent: list[dict[str, str]] = []

    def record(request, **_: object) -> None:  # type: ignore[no-untyped-def]
        sent.append({k.lower(): v for k, v in request.headers.items() if "checksum" in k.lower()})

    store._client.meta.events.register("before-send.s3.PutObject", record)  # type: ignore[attr-defined]
    store._client.meta.events.register("before-send.s3.UploadPart", record)  # type: ignore[attr-defined]
    try:
        for size in (MiB, 11 * MiB):  # one PutObject, then three parts
            data = random_bytes(size, seed=13)
            store.put(f"obj{size}", [data], crc32c=crc32c(memoryview(data)))
            assert store.get(f"obj{size}") == data
    finally:
        store.close()
    assert len(sent) == 4
    assert all(list(headers) == ["x-amz-checksum-crc32c"] for headers in sent), sent


def test_a_saves_objects_carry_their_crc32c_to_the_server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The writer hands the CRC32C it records in the manifest to the store, so the server
    checked every data object of a save against it."""
    target = make_target("seaweedfs-boto3", request, tmp_path)
    state = {"w": torch.randn(5 * MiB), "b": torch.arange(1000)}  # 20 MiB: 3 objects
    shardckpt.save(state, f"{target.uri}/ckpt", **target.options)
    location = parse_uri(target.uri)
    client = boto3.client(
        "s3", endpoint_url=str(target.options["endpoint"]), region_name="us-east-1"
    )
    listed = client.list_objects_v2(Bucket=location.bucket, Prefix=f"{location.prefix}/ckpt/")
    data_keys = [o["Key"] for o in listed["Contents"] if not o["Key"].endswith(".json")]
    assert len(data_keys) == 3, data_keys
    for key in data_keys:
        body = client.get_object(Bucket=location.bucket, Key=key)["Body"].read()
        reply = client.head_object(Bucket=location.bucket, Key=key, ChecksumMode="ENABLED")
        assert reply.get("ChecksumCRC32C") == b64(crc32c(memoryview(body))), key
