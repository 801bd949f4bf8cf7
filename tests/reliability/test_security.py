"""A checkpoint may come from an untrusted bucket or copy. Its manifest cannot make a load read
outside the checkpoint (``..``, absolute names, other prefixes, and on the local backend
symlinks); values that need full unpickling are refused unless ``trusted=True`` (so code in a
pickle does not run); and the secret key never shows in logs, errors or manifests.
"""

from __future__ import annotations

import logging
import os
import shutil
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt import (
    Checkpointer,
    InvalidURIError,
    ManifestError,
    SaveFailedError,
    ShardReader,
    ShardWriter,
)
from shardckpt.format.layout import MANIFEST_NAME, Layout
from shardckpt.store import ObjectStore, RetryPolicy, open_store
from shardckpt.testing.servers import ACCESS_KEY, SECRET_KEY
from shardckpt.tools.verify import verify_checkpoint
from tests.manifest.edit import rewrite_manifest
from tests.reliability.conftest import s3_options
from tests.reliability.fault_proxy import FaultProxy, Rule, on
from tests.reliability.test_faults import big_state, fault_mix

MiB = 1 << 20
ESCAPES = [
    "../other/attempt-0000000000000000/rank0-000000",  # a sibling checkpoint's data
    "../../elsewhere/rank0-000000",
    "/etc/passwd",
    "attempt-0000000000000000/../../other/attempt-0000000000000000/rank0-000000",
    "attempt-0000000000000000//rank0-000000",
    "./rank0-000000",
    "attempt-0000000000000000\\..\\..\\other\\rank0-000000",
    MANIFEST_NAME,
]


def _save(uri: str, options: dict[str, Any]) -> dict[str, Any]:
    state = {"w": torch.arange(1000, dtype=torch.float32), "n": {"k": 1}}
    dcp.save(state, storage_writer=ShardWriter(uri, **options))
    return state


def _rewrite_first_object(store: ObjectStore, prefix: str, name: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["streams"][0]["objects"][0][0] = name

    rewrite_manifest(store, f"{prefix}/{MANIFEST_NAME}", edit)  # re-sealed: the name is refused


@pytest.mark.parametrize("name", ESCAPES)
@pytest.mark.parametrize("backend", ["local", "moto"])
def test_manifest_names_cannot_leave_the_checkpoint(
    backend: str, name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "local":
        root, options, proxy = str(tmp_path / "root"), {}, None
    else:  # through the proxy (no faults), to see every request the load makes
        proxy, bucket = request.getfixturevalue("proxy"), request.getfixturevalue("bucket")
        root, options = f"s3://{bucket}/root", {"endpoint": proxy.endpoint}
    store = open_store(root, **options)
    _save(f"{root}/other", options)  # the data a forged manifest would point at
    _save(f"{root}/ckpt", options)
    _rewrite_first_object(store, "ckpt", name)
    before = proxy.requests if proxy else 0
    with pytest.raises(ManifestError, match="outside its checkpoint") as info:
        ShardReader(f"{root}/ckpt", **options).read_metadata()
    assert store.uri(f"ckpt/{MANIFEST_NAME}") in str(info.value) and repr(name) in str(info.value)
    with pytest.raises(ManifestError, match="outside its checkpoint"):
        verify_checkpoint(store, Layout("ckpt"))
    with pytest.raises(CheckpointException) as load:
        dcp.load(
            {"w": torch.zeros(1000), "n": {"k": 0}},
            storage_reader=ShardReader(f"{root}/ckpt", **options),
        )
    assert "outside its checkpoint" in str(next(iter(load.value.failures.values()))[0])
    if proxy is not None:  # nothing but manifests was read
        gets = [p for m, p, _ in proxy.log[before:] if m == "GET" and "list-type" not in p]
        assert gets and all(p.endswith(f"/ckpt/{MANIFEST_NAME}") for p in gets), gets


def _move_out(path: Path, outside: Path) -> None:
    """Move ``path`` to ``outside`` and leave a symlink to it in its place."""
    shutil.move(str(path), str(outside))
    os.symlink(outside, path)


def test_local_symlinks_cannot_leave_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    _save(str(root / "ckpt"), {})
    store = open_store(str(root))
    # 1. The data of a checkpoint behind a symlink: the same bytes (checksums would pass).
    attempt = next(p for p in (root / "ckpt").iterdir() if p.name.startswith("attempt-"))
    _move_out(attempt, outside / "data")
    for load in (
        lambda: dcp.load(
            {"w": torch.zeros(1000), "n": {"k": 0}}, storage_reader=ShardReader(str(root / "ckpt"))
        ),
        lambda: verify_checkpoint(store, Layout("ckpt")),
    ):
        with pytest.raises((InvalidURIError, CheckpointException)) as info:
            load()
        err = info.value
        if isinstance(err, CheckpointException):
            err = next(iter(err.failures.values()))[0]
        assert (
            isinstance(err, InvalidURIError)
            and "through a symlink" in str(err)
            and attempt.name in str(err)
        )
    # 2. A manifest that is a symlink to one elsewhere.
    _save(str(outside / "foreign"), {})
    (root / "ckpt2").mkdir()
    os.symlink(outside / "foreign" / MANIFEST_NAME, root / "ckpt2" / MANIFEST_NAME)
    with pytest.raises(InvalidURIError, match="through a symlink"):
        ShardReader(str(root / "ckpt2")).read_metadata()
    # 3. A step folder that is a symlink out of the root: discovery refuses to follow it,
    # and nothing can be written through it.
    (outside / "steps").mkdir()
    os.symlink(outside / "steps", root / "step-0000000005")
    with pytest.raises(InvalidURIError, match="through a symlink") as info:
        Checkpointer(root)
    assert "step-0000000005" in str(info.value)
    with pytest.raises(InvalidURIError, match="through a symlink"):
        store.put("step-0000000005/attempt-x/rank0-000000", [b"data"])
    assert list((outside / "steps").iterdir()) == []  # nothing written out there


def test_a_symlinked_root_is_fine(tmp_path: Path) -> None:
    """The guard is against escaping the root, not against a root that is itself a link."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with Checkpointer(tmp_path / "link") as ck:
        ck.save(1, {"w": torch.arange(5.0)}).wait()
        out = {"w": torch.zeros(5)}
        ck.load(out)
    assert torch.equal(out["w"], torch.arange(5.0))


class Payload:
    """A value whose unpickling creates ``path``: what code in a hostile pickle could do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_code_in_a_pickle_does_not_run_unless_trusted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    uri = str(tmp_path / "run" / "step-0000000001")  # where a Checkpointer finds step 1
    dcp.save({"w": torch.ones(2), "evil": Payload(str(marker))}, storage_writer=ShardWriter(uri))
    assert not marker.exists()
    with Checkpointer(tmp_path / "run") as ck:
        with pytest.raises(ManifestError, match="trusted=True") as info:
            ck.load({"w": torch.zeros(2), "evil": None})
        assert "'evil'" in str(info.value)
    with pytest.raises(CheckpointException):
        dcp.load(
            {"w": torch.zeros(2), "evil": None},
            storage_reader=ShardReader(tmp_path / "run" / "step-0000000001"),
        )
    assert not marker.exists(), "the pickle ran"
    with Checkpointer(tmp_path / "run", trusted=True) as ck:  # the payload is live: trusted runs it
        out: dict[str, Any] = {"w": torch.zeros(2), "evil": None}
        ck.load(out)
        out["evil"].close()
    assert marker.exists()


def test_the_secret_key_never_shows(
    proxy: FaultProxy, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Saves, loads, retries and failures with every logger at DEBUG (botocore included):
    the secret key is in no log record, error message, traceback or manifest."""
    assert (
        os.environ.get("AWS_SECRET_ACCESS_KEY") == SECRET_KEY
    )  # the key in use: a leak is possible
    for name in (None, "botocore", "shardckpt"):  # None: the root logger
        caplog.set_level(logging.DEBUG, logger=name)
    proxy.set_rules(fault_mix())
    texts: list[str] = []
    uri = f"s3://{bucket}/run"
    with Checkpointer(uri, object_size=MiB, **s3_options(proxy.endpoint)) as ck:
        state = big_state(1, 2)
        ck.save(1, state).wait()
        out = big_state(2, 2)
        ck.load(out)
        proxy.set_rules([Rule("internal", match=on("PUT"))])
        ck.save(2, state)
        with pytest.raises(SaveFailedError) as info:
            ck.wait()
        texts += [str(info.value), "".join(traceback.format_exception(info.value))]
    bad = open_store(uri, endpoint=proxy.endpoint, retry=RetryPolicy(max_attempts=1))
    proxy.set_rules([])
    texts.append(bad.get(f"step-0000000001/{MANIFEST_NAME}").decode())
    for record in caplog.records:
        texts.append(record.getMessage())
        if record.exc_info:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
    names = {r.name.split(".")[0] for r in caplog.records}
    assert {"botocore", "shardckpt"} <= names and len(caplog.records) > 100, names
    everything = "\n".join(texts)
    assert f"Credential={ACCESS_KEY}/" in everything  # signed requests were logged ...
    assert SECRET_KEY not in everything  # ... but never the secret
