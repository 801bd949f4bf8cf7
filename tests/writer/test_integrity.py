"""A checkpoint is committed by its manifest alone, and every byte read is verified."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    IncompleteCheckpointError,
    ManifestError,
    ObjectNotFoundError,
    SaveFailedError,
    ShardReader,
    ShardWriter,
)
from shardckpt.format.layout import MANIFEST_NAME
from shardckpt.store import ObjectStore
from tests.conftest import Target, make_target
from tests.manifest.edit import sealed, unsealed
from tests.writer.states import assert_same, make_state


def _cause(exc: BaseException) -> BaseException:
    """DCP wraps per-rank failures in CheckpointException; return rank 0's."""
    if isinstance(exc, CheckpointException):
        return next(iter(exc.failures.values()))[0]  # (exception, traceback)
    return exc


def _load_error(
    uri: str, options: dict[str, Any], state: dict[str, Any] | None = None, **reader: Any
) -> BaseException:
    """The error of loading ``uri``. DCP turns a failed ``read_metadata`` into an
    AssertionError carrying our message, so manifest errors are taken from the reader."""
    try:
        ShardReader(uri, **options, **reader).read_metadata()
    except Exception as exc:
        with pytest.raises((Exception, CheckpointException)) as info:
            dcp.load(make_state(2, 1), storage_reader=ShardReader(uri, **options, **reader))
        assert str(exc) in str(_cause(info.value)), "dcp.load must carry our message"
        return exc
    with pytest.raises((Exception, CheckpointException)) as info:
        dcp.load(
            state if state is not None else make_state(2, 1),
            storage_reader=ShardReader(uri, **options, **reader),
        )
    return _cause(info.value)


@pytest.fixture(params=["local", "moto-boto3"])
def saved(request: pytest.FixtureRequest, tmp_path) -> tuple[Target, ObjectStore, str]:  # type: ignore[no-untyped-def]
    target = make_target(request.param, request, tmp_path)
    uri = f"{target.uri}/ckpt"
    dcp.save(
        make_state(1, 1), storage_writer=ShardWriter(uri, object_size=1 << 20, **target.options)
    )
    return target, target.open(), uri


def _data_keys(store: ObjectStore) -> list[str]:
    return [o.key for o in store.list("ckpt/") if not o.key.endswith(MANIFEST_NAME)]


def test_states_differ_is_detected() -> None:
    with pytest.raises(AssertionError):
        assert_same(make_state(1, 1), make_state(2, 1))


def test_deleted_manifest_makes_checkpoint_invisible(saved) -> None:  # type: ignore[no-untyped-def]
    target, store, uri = saved
    store.delete([f"ckpt/{MANIFEST_NAME}"])
    err = _load_error(uri, target.options)
    assert isinstance(err, IncompleteCheckpointError) and "ckpt" in str(err)


def test_nothing_there_is_not_found(saved) -> None:  # type: ignore[no-untyped-def]
    target, _, uri = saved
    err = _load_error(uri + "-other", target.options)
    assert isinstance(err, CheckpointNotFoundError) and "ckpt-other" in str(err)


@pytest.mark.parametrize("which", ["first", "last"])
def test_flipped_byte_in_any_object_is_detected(saved, which: str) -> None:  # type: ignore[no-untyped-def]
    target, store, uri = saved
    keys = _data_keys(store)
    key = keys[0] if which == "first" else keys[-1]
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0x01
    store.put(key, [bytes(data)])
    err = _load_error(uri, target.options)
    assert isinstance(err, ChecksumMismatchError) and key in str(err)


def test_truncated_object_is_detected(saved) -> None:  # type: ignore[no-untyped-def]
    target, store, uri = saved
    key = _data_keys(store)[0]
    store.put(key, [store.get(key)[:-10]])
    err = _load_error(uri, target.options)
    assert isinstance(err, ChecksumMismatchError | ObjectNotFoundError) and key in str(err)


def test_missing_object_is_detected(saved) -> None:  # type: ignore[no-untyped-def]
    target, store, uri = saved
    key = _data_keys(store)[0]
    store.delete([key])
    err = _load_error(uri, target.options)
    assert isinstance(err, ObjectNotFoundError) and key in str(err)


def test_second_commit_fails_and_overwrite_replaces(saved) -> None:  # type: ignore[no-untyped-def]
    target, store, uri = saved
    if not target.conditional_put:
        pytest.skip("server ignores If-None-Match")
    with pytest.raises((Exception, CheckpointException)) as info:
        dcp.save(make_state(2, 1), storage_writer=ShardWriter(uri, **target.options))
    assert isinstance(_cause(info.value), CheckpointExistsError)
    dcp.save(make_state(2, 1), storage_writer=ShardWriter(uri, overwrite=True, **target.options))
    loaded = make_state(3, 1)
    dcp.load(loaded, storage_reader=ShardReader(uri, **target.options))
    assert_same(loaded, make_state(2, 1))


def test_racing_commit_loses_with_checkpoint_exists(saved) -> None:  # type: ignore[no-untyped-def]
    """The early existence check passed, then another writer committed: the conditional put
    of the manifest is what decides."""
    target, store, uri = saved
    if not target.conditional_put:
        pytest.skip("server ignores If-None-Match")
    store.delete([f"ckpt/{MANIFEST_NAME}"])
    writer = ShardWriter(uri, **target.options)
    writer.set_up_storage_writer(True)  # passes: no manifest yet
    dcp.save(
        make_state(4, 1), storage_writer=ShardWriter(uri, **target.options)
    )  # the other writer wins
    with pytest.raises((Exception, CheckpointException)) as info:
        dcp.save(make_state(5, 1), storage_writer=_NoPrecheck(uri, **target.options))
    assert isinstance(_cause(info.value), CheckpointExistsError)
    loaded = make_state(6, 1)
    dcp.load(loaded, storage_reader=ShardReader(uri, **target.options))
    assert_same(loaded, make_state(4, 1))


class _NoPrecheck(ShardWriter):
    """A writer that lost the race after its early check (the check is skipped)."""

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        overwrite = self.options
        object.__setattr__(overwrite, "overwrite", True)
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)
        object.__setattr__(overwrite, "overwrite", False)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x80\x04garbage", "invalid JSON"),
        (b'{"hello": 1}', "not a shardckpt manifest"),
        (None, "version 99"),
        (None, "corrupt manifest"),
        (None, "outside its checkpoint"),
    ],
)
def test_bad_manifest_gives_clear_error(saved, content: bytes | None, message: str) -> None:  # type: ignore[no-untyped-def]
    target, store, uri = saved
    key = f"ckpt/{MANIFEST_NAME}"
    if content is None:  # an edit, re-sealed: the field checks must catch it
        doc = unsealed(store.get(key))
        if message == "version 99":
            doc["version"] = 99
        elif message == "corrupt manifest":
            del doc["streams"]
        else:
            doc["streams"][0]["objects"][0][0] = "../../elsewhere/secret"
        content = sealed(doc)
    store.put(key, [content])
    err = _load_error(uri, target.options)
    assert isinstance(err, ManifestError) and message in str(err) and "manifest.json" in str(err)


class Custom:
    def __init__(self, x: int) -> None:
        self.x = x


def test_values_needing_full_unpickling_are_refused_unless_trusted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    uri = str(tmp_path / "ckpt")
    dcp.save({"obj": Custom(3), "t": torch.ones(2)}, storage_writer=ShardWriter(uri))
    err = _load_error(uri, {}, {"obj": None, "t": torch.zeros(2)})
    assert isinstance(err, ManifestError) and "trusted=True" in str(err) and "obj" in str(err)
    state: dict[str, Any] = {"obj": None, "t": torch.zeros(2)}
    dcp.load(state, storage_reader=ShardReader(uri, trusted=True))
    assert state["obj"].x == 3


@pytest.mark.parametrize("backend", ["local", "moto-boto3"])
def test_single_save_and_load_raise_shardckpt_errors(
    backend: str, request: pytest.FixtureRequest, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """shardckpt.save / load raise our types (caught by ``except Exception``), never DCP's
    CheckpointException (a BaseException) or its AssertionError for a missing manifest."""
    import shardckpt

    target = make_target(backend, request, tmp_path)
    missing = f"{target.uri}/nothing"
    try:
        shardckpt.load(missing, **target.options)
        raise AssertionError("loaded a missing checkpoint")
    except Exception as exc:
        assert isinstance(exc, CheckpointNotFoundError) and missing in str(exc), repr(exc)
    uri = f"{target.uri}/ckpt"
    shardckpt.save({"w": torch.ones(3)}, uri, **target.options)
    try:
        shardckpt.save({"w": torch.zeros(3)}, uri, **target.options)
        raise AssertionError("saved over a checkpoint")
    except Exception as exc:
        assert isinstance(exc, CheckpointExistsError) and f"{uri}/manifest.json" in str(exc)
    assert torch.equal(shardckpt.load(uri, **target.options)["w"], torch.ones(3))


@pytest.mark.parametrize("backend", ["local", "moto-boto3"])
def test_storage_meta_as_dcp_records_it(
    backend: str, request: pytest.FixtureRequest, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """PyTorch's test_compatibility.py::test_storage_meta with our writer and reader, and a
    BytesIO value (DCP pickles it; unpickling restores only its bytes) loads untrusted."""
    import io

    target = make_target(backend, request, tmp_path)
    uri = f"{target.uri}/ckpt"
    writer = ShardWriter(uri, **target.options)
    dcp.save({"a": torch.zeros(4, 4), "raw": io.BytesIO(b"\x00raw bytes")}, storage_writer=writer)
    reader = ShardReader(uri, **target.options)
    storage_meta = reader.read_metadata().storage_meta
    assert storage_meta is not None
    assert str(storage_meta.checkpoint_id) == uri
    assert storage_meta.save_id == writer.save_id
    assert storage_meta.load_id == reader.load_id
    out: dict[str, Any] = {"a": torch.ones(4, 4), "raw": io.BytesIO()}
    dcp.load(out, storage_reader=ShardReader(uri, **target.options))
    assert torch.equal(out["a"], torch.zeros(4, 4)) and out["raw"].getvalue() == b"\x00raw bytes"


class _DeleteBeforeCommit(ShardWriter):
    """A writer whose data object is deleted (as gc would) between upload and commit."""

    def finish(self, metadata: Any, results: Any) -> None:
        keys = [o.key for o in self.store.list() if "rank0-" in o.key]
        self.store.delete(keys[:1])
        self.deleted = self.store.uri(keys[0])
        super().finish(metadata, results)


@pytest.mark.parametrize("backend", ["local", "moto-boto3"])
def test_commit_refuses_a_manifest_naming_deleted_data(
    backend: str, request: pytest.FixtureRequest, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    target = make_target(backend, request, tmp_path)
    uri = f"{target.uri}/ckpt"
    writer = _DeleteBeforeCommit(uri, object_size=1 << 20, **target.options)
    with pytest.raises(CheckpointException) as info:
        dcp.save(make_state(1, 1), storage_writer=writer)
    err = _cause(info.value)
    assert isinstance(err, SaveFailedError) and writer.deleted in str(err), err
    assert "is missing at commit time" in str(err)
    assert writer.store.head(MANIFEST_NAME) is None, "nothing committed"
    with pytest.raises((IncompleteCheckpointError, CheckpointNotFoundError)):
        ShardReader(uri, **target.options).read_metadata()
