"""The CRT transport's own settings and data path, against moto over HTTP.

Its part size and throughput target are s3torchconnector's defaults (8 MiB, 10 Gbit/s)
unless given; a read spanning several of its parts lands in the destination views in
order, whatever their sizes; and ``close`` ends the CRT client's threads.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator

import boto3
import numpy as np
import pytest
import torch

from shardckpt.store import ObjectStore, S3Config, open_store
from shardckpt.testing.servers import LocalS3Server

MiB = 1 << 20
CRT_PART = 8 * MiB  # s3torchconnector's default, spelled out rather than imported


@pytest.fixture
def open_on_moto(moto: LocalS3Server) -> Iterator[Callable[..., ObjectStore]]:
    """Open a fresh bucket on moto with the given options; closed afterwards."""
    bucket = f"crt-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(bucket)
    opened: list[ObjectStore] = []

    def _open(**options: object) -> ObjectStore:
        store = open_store(f"s3://{bucket}/root", endpoint=moto.endpoint, **options)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


def etag(moto: LocalS3Server, store: ObjectStore, key: str) -> str:
    """moto's ETag of ``key``: a multipart upload's ends in ``-<parts>``."""
    client = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1")
    bucket = store.uri().removeprefix("s3://").split("/")[0]
    return client.head_object(Bucket=bucket, Key=f"root/{key}")["ETag"].strip('"')


def odd_views(total: int) -> list[memoryview]:
    """Destination views covering ``total`` bytes: empty ones first, in the middle and last,
    and boundaries 1 byte before, on and after 8 MiB (a CRT part) from the start; bytearrays,
    a uint8 numpy array and a float32 tensor's bytes."""
    head = [0, CRT_PART - 1, 1]
    views = [memoryview(bytearray(n)) for n in head]
    views.append(memoryview(np.zeros(1, dtype=np.uint8)))
    views.append(memoryview(bytearray(0)))
    views.append(
        memoryview(torch.zeros((CRT_PART - 4) // 4, dtype=torch.float32).numpy()).cast("B")
    )
    views.append(memoryview(bytearray(total - sum(len(v) for v in views))))
    views.append(memoryview(bytearray(0)))
    return views


def test_crt_parts_are_8_mib_by_default(
    moto: LocalS3Server, open_on_moto: Callable[..., ObjectStore]
) -> None:
    """The CRT cuts an upload into parts of 8 MiB (s3torchconnector's default; it used to
    take boto3's 16 MiB, which made reads 1.5-2x slower), ``part_size`` still overrides it,
    and boto3's own default is unchanged."""
    data = np.random.default_rng(0).bytes(2 * CRT_PART + 12345)
    crt, crt16 = open_on_moto(transport="crt"), open_on_moto(transport="crt", part_size=16 * MiB)
    boto = open_on_moto(transport="boto3", multipart_threshold=1)
    for store, parts in ((crt, 3), (crt16, 2), (boto, 2)):
        store.put("obj", [data])
        assert etag(moto, store, "obj").endswith(f"-{parts}"), store.config  # type: ignore[attr-defined]
    assert S3Config(transport="crt").resolved_part_size() == CRT_PART
    assert S3Config().resolved_part_size() == 16 * MiB


def test_crt_read_across_parts_lands_in_odd_views(open_on_moto: Callable[..., ObjectStore]) -> None:
    """A ranged read of several CRT parts, from an offset inside the first, into views whose
    boundaries fall everywhere but on the parts' (and empty views anywhere)."""
    store = open_on_moto(transport="crt")
    data = np.random.default_rng(1).bytes(3 * CRT_PART + 999)
    store.put("obj", [data])
    for offset in (0, 12345):
        views = odd_views(len(data) - offset - 100)
        store.get_into("obj", offset, views)
        pos = offset
        for view in views:
            assert view.tobytes() == data[pos : pos + len(view)], f"offset {offset}: at {pos}"
            pos += len(view)


def test_crt_throughput_target_reaches_the_client(
    open_on_moto: Callable[..., ObjectStore],
) -> None:
    store = open_on_moto(transport="crt", throughput_target_gbps=25.0)
    store.put("obj", [b"x"])
    native = store._native  # type: ignore[attr-defined]  # the real CRT client
    assert native.throughput_target_gbps == 25.0
    assert native.part_size == CRT_PART
    default = open_on_moto(transport="crt")
    assert default._native.throughput_target_gbps == 10.0  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_throughput_target_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="throughput_target_gbps must be positive"):
        open_store("s3://bucket/x", transport="crt", throughput_target_gbps=value)


def _crt_threads() -> int:
    """Threads of this process that the AWS CRT started (event loops, host resolver)."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().startswith("Aws")
        except OSError:  # the thread ended while we looked
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_close_ends_the_crt_clients_threads(open_on_moto: Callable[..., ObjectStore]) -> None:
    before = _crt_threads()
    store = open_on_moto(transport="crt")
    store.put("obj", [b"data"])
    assert _crt_threads() > before  # the client is made on first use, with its threads
    store.close()  # the store itself stays referenced: close alone must let them go
    deadline = time.monotonic() + 10
    while _crt_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _crt_threads() <= before
