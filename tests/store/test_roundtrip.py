"""Round trips through every store target: what goes in comes back out, byte for byte.

Runs on every target of ``conftest.TARGETS`` (local, moto over boto3 and CRT, rclone over
boto3, SeaweedFS over boto3 and CRT). Where a server lets us see how an object was uploaded (moto's multipart ETags end in
``-<parts>``), the tests check that the path they mean to exercise really was taken.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import numpy as np
import pytest
import torch

from shardckpt.errors import (
    ChecksumMismatchError,
    InvalidURIError,
    ObjectExistsError,
    ObjectNotFoundError,
    StoreError,
)
from shardckpt.store import ObjectStore, RetryPolicy, S3Config, open_store
from shardckpt.testing.servers import LocalS3Server
from shardckpt.uri import parse_uri

if TYPE_CHECKING:
    from tests.conftest import Target

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
# S3's documented limits, spelled out here rather than imported, so a wrong constant in the
# package cannot make its own test pass.
S3_MAX_PARTS = 10_000
S3_MIN_PART = 5 * MiB
S3_MAX_PART = 5 * GiB
PART_SIZE = S3Config().resolved_part_size()  # boto3's default


@lru_cache(maxsize=8)
def random_bytes(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def moto_etag(target: Target, key: str) -> str | None:
    """The ETag moto reports for ``key`` (multipart uploads end in ``-<parts>``), or None
    where the target is not moto."""
    if not target.name.startswith("moto"):
        return None
    location = parse_uri(target.uri)
    client = boto3.client(
        "s3", endpoint_url=str(target.options["endpoint"]), region_name="us-east-1"
    )
    return client.head_object(Bucket=location.bucket, Key=f"{location.prefix}/{key}")["ETag"].strip(
        '"'
    )


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, 5 * MiB - 1, PART_SIZE], ids=["0B", "1B", "5MiB-1", "part_size"]
)
def test_roundtrip_sizes(store: ObjectStore, size: int) -> None:
    data = random_bytes(size)
    store.put("obj", [data])
    assert store.get("obj") == data
    info = store.head("obj")
    assert info is not None and info.key == "obj" and info.size == size
    out = bytearray(size)
    store.get_into("obj", 0, [memoryview(out)])
    assert out == data


@pytest.mark.parametrize(
    ("size", "parts"),
    [(5 * MiB - 1, 1), (PART_SIZE, 1), (PART_SIZE + 1, 2), (2 * PART_SIZE, 2)],
    ids=["5MiB-1", "part_size", "part_size+1", "2*part_size"],
)
def test_roundtrip_multipart_boundaries(
    target: Target, open_with: Callable[..., ObjectStore], size: int, parts: int
) -> None:
    store = open_with(multipart_threshold=1)
    data = random_bytes(size)
    store.put("obj", [data])
    assert store.get("obj") == data
    assert store.head("obj").size == size  # type: ignore[union-attr]
    etag = moto_etag(target, "obj")
    if etag is not None and target.options["transport"] == "boto3":
        assert etag.endswith(f"-{parts}"), f"expected a {parts}-part upload, got ETag {etag}"


@pytest.mark.slow
def test_roundtrip_100mib_multipart(target: Target, open_with: Callable[..., ObjectStore]) -> None:
    size = 100 * MiB
    store = open_with(multipart_threshold=8 * MiB, part_size=PART_SIZE)
    data = random_bytes(size, seed=1)
    store.put("big", [data])
    etag = moto_etag(target, "big")
    if etag is not None:  # boto3 and the CRT both cut it into part_size parts
        assert etag.endswith(f"-{-(-size // PART_SIZE)}"), f"not a multipart upload: ETag {etag}"
    assert store.head("big").size == size  # type: ignore[union-attr]
    assert store.get("big") == data
    # Ranges that straddle part boundaries.
    for offset in (PART_SIZE - 3, 3 * PART_SIZE - 1, size - 7):
        out = bytearray(min(1001, size - offset))
        store.get_into("big", offset, [memoryview(out)])
        assert out == data[offset : offset + len(out)]


# -- data given as several buffers ---------------------------------------------------------


def mixed_buffers(scale: int) -> tuple[list[object], bytes]:
    """bytes, a sliced memoryview, an empty buffer, a float32 numpy array, a 2-D int16 array
    and a CPU tensor's bytes; ``scale`` multiplies their sizes. Returns (buffers, expected)."""
    rng = np.random.default_rng(scale)
    raw = rng.bytes(1000 * scale + 1)
    backing = bytearray(rng.bytes(3001 * scale + 10))
    sliced = memoryview(backing)[7 : 2900 * scale + 3]
    floats = rng.standard_normal(12345 * scale).astype(np.float32)
    grid = np.arange(60 * scale, dtype=np.int16).reshape(6 * scale, 10)
    tensor = torch.from_numpy(rng.standard_normal(777 * scale)).to(torch.float32)
    tensor_bytes = tensor.numpy().view(np.uint8)
    buffers: list[object] = [raw, sliced, b"", floats, grid, tensor_bytes, b"x"]
    expected = b"".join(
        [raw, sliced.tobytes(), floats.tobytes(), grid.tobytes(), tensor.numpy().tobytes(), b"x"]
    )
    return buffers, expected


def test_put_several_buffers(store: ObjectStore) -> None:
    buffers, expected = mixed_buffers(1)
    store.put("mixed", buffers)  # type: ignore[arg-type]
    assert store.get("mixed") == expected
    assert store.head("mixed").size == len(expected)  # type: ignore[union-attr]


def test_put_several_buffers_multipart(
    target: Target, open_with: Callable[..., ObjectStore]
) -> None:
    """Buffers of odd sizes whose boundaries fall inside parts, and parts inside buffers."""
    store = open_with(multipart_threshold=1, part_size=5 * MiB)
    buffers, expected = mixed_buffers(250)  # ~14 MiB: three 5 MiB parts
    assert 10 * MiB < len(expected) <= 15 * MiB
    store.put("mixed", buffers)  # type: ignore[arg-type]
    assert store.get("mixed") == expected
    etag = moto_etag(target, "mixed")
    if etag is not None:
        assert etag.endswith("-3"), f"expected a 3-part upload, got ETag {etag}"


# -- ranged reads --------------------------------------------------------------------------


def test_get_into_ranges(store: ObjectStore) -> None:
    size = 3 * MiB + 17
    data = random_bytes(size, seed=2)
    store.put("ranged", [data])
    for offset in (0, 1, 4093, MiB + 3, size - 6057):
        plain = bytearray(1)
        sliced_backing = bytearray(4099)
        sliced = memoryview(sliced_backing)[3:4000]
        array = np.zeros(1001, dtype=np.uint8)
        tensor = torch.zeros(64, dtype=torch.float32)
        views = [
            memoryview(plain),
            memoryview(bytearray(0)),
            sliced,
            memoryview(array),
            memoryview(tensor.numpy()).cast("B"),
            memoryview(bytearray(0)),
        ]
        store.get_into("ranged", offset, views)
        pos = offset
        for got in (bytes(plain), sliced.tobytes(), array.tobytes(), tensor.numpy().tobytes()):
            assert got == data[pos : pos + len(got)], f"offset {offset}: mismatch at byte {pos}"
            pos += len(got)
        assert bytes(sliced_backing[:3]) == b"\0\0\0" and bytes(sliced_backing[4000:]) == b"\0" * 99


def test_get_into_to_the_end_and_past_it(store: ObjectStore) -> None:
    data = random_bytes(10_000, seed=3)
    store.put("short", [data])
    tail = bytearray(100)
    store.get_into("short", len(data) - 100, [memoryview(tail)])
    assert tail == data[-100:]
    store.get_into("short", 123, [])  # nothing to read is not an error
    with pytest.raises(ChecksumMismatchError, match="short"):
        store.get_into("short", len(data) - 10, [memoryview(bytearray(11))])
    with pytest.raises(ChecksumMismatchError, match="short"):
        store.get_into("short", len(data), [memoryview(bytearray(1))])


# -- many objects, in parallel -------------------------------------------------------------


def test_parallel_put_then_get(store: ObjectStore) -> None:
    rng = np.random.default_rng(4)
    sizes = [0] + [int(s) for s in rng.integers(1, 256 * 1024, 49)]
    objects = {f"par/{i:03d}": rng.bytes(size) for i, size in enumerate(sizes)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: store.put(kv[0], [kv[1]]), objects.items()))

    listed = list(store.list("par/"))
    assert [o.key for o in listed] == sorted(objects)
    assert {o.key: o.size for o in listed} == {k: len(v) for k, v in objects.items()}

    def read_back(key: str) -> bytes:
        out = bytearray(len(objects[key]))
        store.get_into(key, 0, [memoryview(out)])
        return bytes(out)

    with ThreadPoolExecutor(16) as pool:
        assert dict(zip(objects, pool.map(read_back, objects), strict=True)) == objects
        assert dict(zip(objects, pool.map(store.get, objects), strict=True)) == objects


# -- list, delete, head, overwrite ---------------------------------------------------------


def test_list_by_prefix(target: Target, store: ObjectStore) -> None:
    # '-' < '/' < '0' < 'b': a store that sorts by path components instead of whole keys fails.
    # SeaweedFS does (its filer walks a directory tree); nothing of shardckpt relies on the
    # order, so there the test checks what each prefix lists, in any order.
    keys = {"a/1": 1, "a/10": 10, "a/2": 2, "a/sub/y": 3, "a-b": 4, "a0": 5, "ab": 6, "b/x": 7}
    before = time.time()
    for key, size in keys.items():
        store.put(key, [b"z" * size])

    def listed(prefix: str) -> list[tuple[str, int]]:
        found = [(o.key, o.size) for o in store.list(prefix)]
        return found if target.lists_in_key_order else sorted(found)

    everything = sorted(keys.items())
    assert listed("") == everything
    assert listed("a") == [kv for kv in everything if kv[0].startswith("a")]
    assert listed("a/") == [("a/1", 1), ("a/10", 10), ("a/2", 2), ("a/sub/y", 3)]
    assert listed("a/1") == [("a/1", 1), ("a/10", 10)]
    assert listed("a/s") == [("a/sub/y", 3)]
    assert listed("b/") == [("b/x", 7)]
    assert listed("nothing/") == []
    for info in store.list():
        assert before - 120 < info.mtime < time.time() + 120, (
            f"implausible mtime {info.mtime} for {info.key}"
        )


def test_delete(store: ObjectStore) -> None:
    for key in ("d/1", "d/2", "d/3"):
        store.put(key, [key.encode()])
    store.delete(["d/1", "d/missing", "d/3", "never/was"])
    assert [o.key for o in store.list("d/")] == ["d/2"]
    assert store.head("d/1") is None
    with pytest.raises(ObjectNotFoundError):
        store.get("d/3")
    store.delete([])
    store.delete(["d/1"])  # deleting twice is fine
    assert store.get("d/2") == b"d/2"


def test_head(store: ObjectStore) -> None:
    assert store.head("missing") is None
    assert store.head("dir/missing") is None
    store.put("dir/present", [b"12345"])
    info = store.head("dir/present")
    assert info is not None and (info.key, info.size) == ("dir/present", 5)
    assert store.head("dir") is None  # a prefix is not an object
    with pytest.raises(StoreError):
        store.get("dir")


def test_overwrite_replaces_the_object(store: ObjectStore) -> None:
    store.put("over", [b"first version, longer"])
    store.put("over", [b"second"])
    assert store.get("over") == b"second"
    assert store.head("over").size == 6  # type: ignore[union-attr]


def test_empty_objects_do_not_stall_the_next_request(open_with: Callable[..., ObjectStore]) -> None:
    """An empty PUT must not poison its pooled connection: with botocore's ``Expect:
    100-continue``, Go servers (rclone, MinIO) answer an empty PUT before any ``100 Continue``,
    and the next PUT on that connection then hangs until the read timeout (boto/botocore#3755).
    No retries here, so a hang is an error rather than a hidden retry."""
    store = open_with(read_timeout=3, retry=RetryPolicy(max_attempts=1))
    for i in range(4):
        store.put(f"e/empty{i}", [])
        store.put(f"e/full{i}", [b"abc"])
        store.put(f"e/also-empty{i}", [b"", memoryview(b"")])
    assert [o.size for o in store.list("e/")] == [0] * 4 + [0] * 4 + [3] * 4
    assert store.get("e/empty0") == b"" and store.get("e/full3") == b"abc"


# -- conditional put -----------------------------------------------------------------------


def test_conditional_put(target: Target, store: ObjectStore) -> None:
    if not target.conditional_put:
        pytest.skip(
            f"{target.name}: the server ignores If-None-Match, so conditional puts are not atomic"
        )
    store.put("manifest", [b"first"], if_absent=True)
    with pytest.raises(ObjectExistsError) as info:
        store.put("manifest", [b"second"], if_absent=True)
    assert store.uri("manifest") in str(info.value)
    assert store.get("manifest") == b"first"
    assert list(store.list_pending_uploads()) == []


def test_conditional_put_race_has_one_winner(target: Target, store: ObjectStore) -> None:
    if not target.conditional_put:
        pytest.skip(
            f"{target.name}: the server ignores If-None-Match, so conditional puts are not atomic"
        )
    writers = 8
    barrier = threading.Barrier(writers)

    def race(i: int) -> bool:
        barrier.wait()
        try:
            store.put("race", [f"writer {i}".encode()], if_absent=True)
            return True
        except ObjectExistsError:
            return False

    with ThreadPoolExecutor(writers) as pool:
        won = list(pool.map(race, range(writers)))
    assert won.count(True) == 1, f"{won.count(True)} writers won"
    assert store.get("race") == f"writer {won.index(True)}".encode()


# -- the part-size rule --------------------------------------------------------------------


@pytest.mark.parametrize("part_size", [S3_MIN_PART, PART_SIZE, 64 * MiB, 5 * MiB + 1])
def test_part_size_rule(part_size: int) -> None:
    config = S3Config(part_size=part_size)
    rng = np.random.default_rng(5)
    sizes = {0, 1, S3_MIN_PART - 1, part_size, part_size + 1, 5 * TiB, 5 * TiB - 1}
    for multiple in (part_size, MiB, MiB + 1):
        for k in (S3_MAX_PARTS - 1, S3_MAX_PARTS, S3_MAX_PARTS + 1):
            sizes |= {multiple * k - 1, multiple * k, multiple * k + 1}
    sizes |= {int(s) for s in rng.integers(0, 5 * TiB, 2000)}
    for size in sorted(s for s in sizes if 0 <= s <= 5 * TiB):
        part = config.part_size_for(size)
        assert part >= S3_MIN_PART and part >= part_size, (size, part)
        assert part <= S3_MAX_PART, (size, part)
        assert -(-size // part) <= S3_MAX_PARTS, (
            f"{size} bytes in parts of {part} is too many parts"
        )


def test_part_size_below_the_s3_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="5 MiB"):
        S3Config(part_size=S3_MIN_PART - 1)


# -- an upload that fails midway leaves nothing behind --------------------------------------


class _Interrupted(BaseException):
    """Stands in for KeyboardInterrupt / SystemExit arriving during an upload."""


@pytest.mark.parametrize("error", [_Interrupted, TimeoutError])
def test_failed_multipart_upload_is_aborted(
    moto: LocalS3Server, error: type[BaseException]
) -> None:
    """Interrupt a real multipart upload once the server holds some of its parts: the upload
    must be aborted, not left pending (S3 bills pending parts until someone aborts them)."""
    bucket = f"abort-{error.__name__.lower().strip('_')}"
    moto.create_bucket(bucket)
    store = open_store(
        f"s3://{bucket}/root",
        endpoint=moto.endpoint,
        transport="boto3",
        multipart_threshold=1,
        part_size=5 * MiB,
        max_concurrency=2,
    )
    client = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1")
    seen_parts: list[int] = []

    def interrupt_once_parts_arrive() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                parts = client.list_parts(
                    Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                if parts.get("Parts"):
                    seen_parts.append(len(parts["Parts"]))
                    os.kill(os.getpid(), signal.SIGUSR1)
                    return
            time.sleep(0.005)

    def on_signal(signum: int, frame: object) -> None:
        raise error("interrupted by the test")

    previous = signal.signal(signal.SIGUSR1, on_signal)
    watcher = threading.Thread(target=interrupt_once_parts_arrive)
    try:
        watcher.start()
        with pytest.raises(error):
            store.put("ckpt/shard", [random_bytes(60 * MiB, seed=6)])
        watcher.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    try:
        assert seen_parts, "the upload finished before the test could interrupt it"
        assert list(store.list_pending_uploads()) == []
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert store.head("ckpt/shard") is None
    finally:
        store.close()


def test_pending_uploads_can_be_listed_and_aborted_on_s3(moto: LocalS3Server) -> None:
    """What a crashed writer leaves on S3 (an upload created and never completed) is listed
    under its key and prefix, and ``abort_upload`` removes it."""
    moto.create_bucket("pending")
    client = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1")
    upload_id = client.create_multipart_upload(Bucket="pending", Key="root/ckpt/1/shard")[
        "UploadId"
    ]
    client.upload_part(
        Bucket="pending", Key="root/ckpt/1/shard", UploadId=upload_id, PartNumber=1, Body=b"x" * 100
    )
    store = open_store("s3://pending/root", endpoint=moto.endpoint)
    try:
        pending = list(store.list_pending_uploads("ckpt/"))
        assert [(p.key, p.upload_id) for p in pending] == [("ckpt/1/shard", upload_id)]
        assert list(store.list_pending_uploads("other/")) == []
        store.abort_upload(pending[0])
        assert list(store.list_pending_uploads()) == []
    finally:
        store.close()


# -- the local backend ---------------------------------------------------------------------


def test_local_reader_never_sees_a_partial_object(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store", fsync=False)
    size, versions = 4 * MiB, 40
    store.put("obj", [np.zeros(size, dtype=np.uint8)])
    done = threading.Event()
    bad: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        out = np.empty(size, dtype=np.uint8)
        while not done.is_set():
            whole = np.frombuffer(store.get("obj"), dtype=np.uint8)
            store.get_into("obj", 0, [memoryview(out)])
            for got in (whole, out):
                if len(got) != size or not (got == got[0]).all():
                    bad.append(f"read {len(got)} bytes, values {np.unique(got)[:5]}")
            reads += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for version in range(1, versions + 1):
            store.put(
                "obj",
                [
                    np.full(size // 2, version, dtype=np.uint8),
                    np.full(size // 2, version, dtype=np.uint8),
                ],
            )
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not bad, bad[:3]
    assert reads > 0
    assert store.get("obj") == bytes([versions]) * size


def test_local_listing_while_objects_come_and_go(tmp_path: Path) -> None:
    """Listings, puts and deletes race in one directory. A file gone between reading its
    directory and its stat is left out, as S3's listing would, not raised (it failed a commit
    race in CI: FileNotFoundError on another writer's temp file). A put whose directory a
    delete prunes (it held the last object) makes the directory again, not 'does not exist'."""
    store = open_store(tmp_path / "store", fsync=False)
    store.put("ckpt/kept", [b"k"])
    done = threading.Event()

    def churn(worker: int) -> None:
        while not done.is_set():
            for i in range(3):
                store.put(f"ckpt/d/w{worker}-{i}", [b"x" * 64])
            store.delete([f"ckpt/d/w{worker}-{i}" for i in range(3)])

    listings = 0
    with ThreadPoolExecutor(2) as pool:
        churners = [pool.submit(churn, w) for w in range(2)]
        try:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                keys = [o.key for o in store.list("ckpt/")]
                assert "ckpt/kept" in keys and all(".tmp-" not in k for k in keys), keys
                list(store.list_pending_uploads("ckpt/"))
                listings += 1
        finally:
            done.set()
        for f in churners:
            f.result()
    assert listings > 10


_CRASHING_WRITER = textwrap.dedent(
    """
    import sys
    from shardckpt.store import open_store
    store = open_store(sys.argv[1])
    data = bytes(8 << 20)
    while True:
        store.put("ckpt/shard", [data])
    """
)


def test_local_pending_uploads_of_a_killed_writer(tmp_path: Path) -> None:
    """A writer killed mid-put leaves a temporary file: not an object, but a pending upload
    under the key it was meant for, which ``abort_upload`` removes."""
    root = tmp_path / "store"
    store = open_store(root)
    for _attempt in range(5):
        writer = subprocess.Popen([sys.executable, "-c", _CRASHING_WRITER, str(root)])
        try:
            deadline = time.monotonic() + 60
            while not list(store.list_pending_uploads()) and time.monotonic() < deadline:
                time.sleep(0.001)
        finally:
            writer.kill()
            writer.wait()
        if list(store.list_pending_uploads()):
            break  # else it was killed between two puts; try again
    pending = list(store.list_pending_uploads())
    assert pending and all(p.key == "ckpt/shard" for p in pending), pending
    assert list(store.list_pending_uploads("ckpt/")) == pending
    assert list(store.list_pending_uploads("elsewhere/")) == []
    assert all(o.key == "ckpt/shard" for o in store.list()), (
        "a temporary file is listed as an object"
    )
    if store.head("ckpt/shard") is not None:  # a completed put is whole
        assert store.get("ckpt/shard") == bytes(8 << 20)
    for upload in pending:
        store.abort_upload(upload)
    assert list(store.list_pending_uploads()) == []
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left in ([], ["ckpt/shard"]), left


@pytest.mark.parametrize(
    "key", ["../x", "a/../../x", "a/../b", "/etc/passwd", "./x", "a//b", "a/", ""]
)
def test_local_rejects_keys_outside_the_root(tmp_path: Path, key: str) -> None:
    store = open_store(tmp_path / "store")
    operations: list[Callable[[], object]] = [
        lambda: store.put(key, [b"x"]),
        lambda: store.get(key),
        lambda: store.get_into(key, 0, [memoryview(bytearray(1))]),
        lambda: store.head(key),
        lambda: store.delete([key]),
    ]
    for operation in operations:
        with pytest.raises(InvalidURIError) as info:
            operation()
        assert repr(key) in str(info.value) and store.uri() in str(info.value)
    assert not (tmp_path / "x").exists()


def test_local_rejects_symlink_escapes(tmp_path: Path) -> None:
    root, outside = tmp_path / "store", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "leak").symlink_to(outside / "secret")
    (root / "inside").mkdir()
    (root / "alias").symlink_to(root / "inside", target_is_directory=True)
    store = open_store(root)
    for key in ("escape/secret", "escape/new", "leak"):
        for operation in (
            lambda key=key: store.put(key, [b"x"]),
            lambda key=key: store.get(key),
            lambda key=key: store.head(key),
            lambda key=key: store.delete([key]),
        ):
            with pytest.raises(InvalidURIError, match="symlink"):
                operation()
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"
    # A symlink that stays inside the root is fine.
    store.put("alias/obj", [b"ok"])
    assert (root / "inside" / "obj").read_bytes() == b"ok"
