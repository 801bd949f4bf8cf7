"""Corruption found without loading: ``verify_checkpoint`` reports a flipped byte, a truncated
object and a missing object by the object's URI, and refuses a manifest of an unknown
version or one that is not a manifest, as a load does and naming the same object.

(tests/writer/test_integrity.py covers the load side in depth; here each case is checked on
the verify side, and once against the load error so both name the same object.)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt import (
    ChecksumMismatchError,
    ManifestError,
    ObjectNotFoundError,
    ShardReader,
    ShardWriter,
)
from shardckpt.format.layout import MANIFEST_NAME, Layout
from shardckpt.store import ObjectStore, open_store
from shardckpt.testing.servers import LocalS3Server
from shardckpt.tools.verify import verify_checkpoint
from tests.manifest.edit import sealed, unsealed

MiB = 1 << 20


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(MiB // 2, generator=g),
        "b": torch.randn(MiB // 2, generator=g),
        "n": {"epoch": 4},
    }


@pytest.fixture(params=["local", "moto"])
def saved(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[ObjectStore, str, dict[str, object]]:
    """A checkpoint of 5 objects; the store opened at its parent."""
    if request.param == "local":
        root, options = str(tmp_path / "root"), {}
    else:
        moto: LocalS3Server = request.getfixturevalue("moto")
        bucket = f"corrupt-{uuid.uuid4().hex[:12]}"
        moto.create_bucket(bucket)
        root, options = f"s3://{bucket}/root", {"endpoint": moto.endpoint}
    dcp.save(_state(), storage_writer=ShardWriter(f"{root}/ckpt", object_size=MiB, **options))
    return open_store(root, **options), f"{root}/ckpt", options


def _data_keys(store: ObjectStore) -> list[str]:
    return sorted(o.key for o in store.list("ckpt/") if not o.key.endswith(MANIFEST_NAME))


def _load_error(uri: str, options: dict[str, object]) -> BaseException:
    out = _state() | {"a": torch.zeros(MiB // 2), "b": torch.zeros(MiB // 2)}
    with pytest.raises(CheckpointException) as info:
        dcp.load(out, storage_reader=ShardReader(uri, **options))
    return next(iter(info.value.failures.values()))[0]


def _flip(store: ObjectStore, key: str) -> str:
    data = bytearray(store.get(key))
    data[len(data) // 3] ^= 0x40
    store.put(key, [bytes(data)])
    return "CRC32C"


def _truncate(store: ObjectStore, key: str) -> str:
    store.put(key, [store.get(key)[:-7]])
    return "manifest says"


def _delete(store: ObjectStore, key: str) -> str:
    store.delete([key])
    return "missing"


@pytest.mark.parametrize(
    "corrupt, load_error",
    [
        (_flip, ChecksumMismatchError),
        (_truncate, (ChecksumMismatchError, ObjectNotFoundError)),
        (_delete, ObjectNotFoundError),
    ],
    ids=["flipped-byte", "truncated", "missing"],
)
def test_verify_names_the_corrupt_object(
    saved, corrupt: Callable[[ObjectStore, str], str], load_error: type
) -> None:  # type: ignore[no-untyped-def]
    store, uri, options = saved
    assert verify_checkpoint(store, Layout("ckpt")).ok  # intact before
    keys = _data_keys(store)
    assert len(keys) == 5  # 4 MiB of tensors and a pickled value, in 1 MiB objects
    victim = keys[2]
    expected = corrupt(store, victim)
    report = verify_checkpoint(store, Layout("ckpt"))
    assert not report.ok and report.objects == 5
    assert list(report.problems) == [store.uri(victim)], report.problems  # that one, only that one
    assert expected in report.problems[store.uri(victim)]
    err = _load_error(uri, options)
    assert isinstance(err, load_error) and victim.rsplit("/", 1)[1] in str(err), repr(err)


@pytest.mark.parametrize(
    "rewrite, message",
    [
        (lambda doc: doc | {"version": 99}, "has manifest version 99"),
        (lambda doc: {"weights": [1, 2, 3]}, "is not a shardckpt manifest"),
        (lambda doc: "PK\x03\x04 a zip file", "is not a shardckpt manifest"),
    ],
    ids=["unknown-version", "other-json", "not-json"],
)
def test_verify_refuses_a_bad_manifest(
    saved, rewrite: Callable[[dict], object], message: str
) -> None:  # type: ignore[no-untyped-def]
    store, uri, options = saved
    key = f"ckpt/{MANIFEST_NAME}"
    new = rewrite(unsealed(store.get(key)))
    store.put(key, [new.encode() if isinstance(new, str) else sealed(new)])
    with pytest.raises(ManifestError) as info:
        verify_checkpoint(store, Layout("ckpt"))
    assert message in str(info.value) and store.uri(key) in str(info.value)
    with pytest.raises(ManifestError) as load:
        ShardReader(uri, **options).read_metadata()
    assert str(load.value) == str(info.value)


def test_verify_checks_every_items_crc32c_as_a_load_does(saved) -> None:  # type: ignore[no-untyped-def]
    """An item's CRC32C that its bytes contradict (objects intact, manifest re-sealed): a
    load refuses it, so verify reports it, naming the item and its object; also for an item
    that spans two objects (its CRC32C combined from the pieces)."""
    store, uri, options = saved
    key = f"ckpt/{MANIFEST_NAME}"
    doc = unsealed(store.get(key))
    names = list(doc["tensors"])
    items = doc["items"][0]
    spanning = next(  # 'b' starts in one 1 MiB object and ends in the next
        k
        for k, (o, n) in enumerate(zip(items["offset"], items["length"], strict=True))
        if o // MiB != (o + n - 1) // MiB
    )
    assert verify_checkpoint(store, Layout("ckpt")).ok  # combined CRC32Cs match
    for k in (spanning, names.index("n.epoch")):
        edited = json.loads(json.dumps(doc))
        edited["items"][0]["crc32c"][k] ^= 1
        store.put(key, [sealed(edited)])
        fqn = names[edited["items"][0]["fqn"][k]]
        report = verify_checkpoint(store, Layout("ckpt"))
        assert not report.ok and len(report.problems) == 1, report.problems
        ((where, problem),) = report.problems.items()
        first = edited["items"][0]["offset"][k] // MiB
        assert where == store.uri(_data_keys(store)[first]) and repr(fqn) in problem
        err = _load_error(uri, options)
        assert isinstance(err, ChecksumMismatchError) and fqn in str(err)
