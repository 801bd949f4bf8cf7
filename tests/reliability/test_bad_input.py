"""Bad input to every public entry point gets one clear error - its type, and a message that
names the URI, key or step - and changes nothing: no object, upload or directory appears.

Entry points: ``ShardWriter`` (through ``dcp.save``), ``ShardReader`` (its manifest read, and
``dcp.load``), ``Checkpointer`` (construction, ``save``, ``load``) and ``open_store``.
``docs/reliability.md`` lists every case with the test that backs it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt import (
    AccessDeniedError,
    BucketNotFoundError,
    Checkpointer,
    CheckpointExistsError,
    CheckpointNotFoundError,
    EndpointUnreachableError,
    InvalidURIError,
    SaveFailedError,
    ShardReader,
    ShardWriter,
    StateDictMismatchError,
)
from shardckpt.store import open_store
from shardckpt.testing.servers import SECRET_KEY, LocalS3Server, _free_port, _wait_for_port
from tests.reliability.workers import Zygote, crash_state

BAD_URIS = [
    ("gs://bucket/ckpt", "unknown URI scheme 'gs'"),
    ("s3://", "no bucket"),
    ("s3:///ckpt", "no bucket"),
    ("s3://Bad_Bucket/ckpt", "invalid S3 bucket name 'Bad_Bucket'"),
    ("s3://bucket/a/../ckpt", "'..' segments are not allowed"),
    ("file://host/tmp/ckpt", "file URI with a host"),
    ("", "empty checkpoint URI"),
]
ENTRIES: dict[str, Callable[..., Any]] = {
    "ShardWriter": lambda uri, **o: dcp.save(
        {"w": torch.ones(3)}, storage_writer=ShardWriter(uri, **o)
    ),
    "ShardReader": lambda uri, **o: ShardReader(uri, **o).read_metadata(),
    "Checkpointer": lambda uri, **o: Checkpointer(uri, **o),
    "open_store": lambda uri, **o: open_store(uri, **o).list_prefixes(""),
}


def error_of(fn: Callable[[], Any]) -> BaseException:
    """What ``fn`` raises; DCP's CheckpointException is unwrapped to its one cause."""
    try:
        fn()
    except CheckpointException as exc:
        assert len(exc.failures) == 1, exc.failures
        return next(iter(exc.failures.values()))[0]
    except BaseException as exc:
        return exc
    raise AssertionError("no error raised")


# -- what "nothing changed" means ------------------------------------------------------------
def local_state(root: Path) -> list[tuple[str, int, float]]:
    """Every file and directory under ``root`` (and whether ``root`` exists)."""
    if not root.exists():
        return [("<absent>", 0, 0.0)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out.append(
                (os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime)
            )
    return sorted(out)


def s3_state(endpoint: str) -> list[Any]:
    """Every bucket, object and unfinished upload on the server."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out: list[Any] = []
    for bucket in sorted(b["Name"] for b in client.list_buckets()["Buckets"]):
        listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        out.append(
            (
                bucket,
                sorted((o["Key"], o["Size"], o["ETag"]) for o in listing),
                sorted(u["UploadId"] for u in uploads),
            )
        )
    return out


@pytest.fixture(scope="module")
def auth_moto() -> Iterator[str]:
    """A moto server that checks credentials (none are known to it: every request is denied)."""
    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port, proc)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def moto_objects(endpoint: str) -> Any:
    """The auth-checking server's whole S3 state, read through moto's own API (no S3 call
    can read it: every one is denied)."""
    with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=10) as reply:
        s3 = json.loads(reply.read()).get("s3", {})
    return {k: s3.get(k) or [] for k in ("FakeBucket", "FakeKey", "FakeMultipart")}


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed


# -- URIs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("uri, message", BAD_URIS, ids=[u or "empty" for u, _ in BAD_URIS])
def test_bad_uri(
    entry: str, uri: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a URI mistaken for a relative path would show up here
    err = error_of(lambda: ENTRIES[entry](uri))
    assert isinstance(err, InvalidURIError), repr(err)
    assert message in str(err) and (uri in str(err) or not uri), str(err)
    assert local_state(tmp_path) == []


# -- servers: a missing bucket, wrong credentials, nothing listening ---------------------------
@pytest.mark.parametrize("entry", ENTRIES)
def test_missing_bucket(entry: str, moto: LocalS3Server) -> None:
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    before = s3_state(moto.endpoint)
    err = error_of(lambda: ENTRIES[entry](uri, endpoint=moto.endpoint))
    assert isinstance(err, BucketNotFoundError), repr(err)
    assert uri.split("/run")[0] in str(err) and "bucket does not exist" in str(err)
    assert s3_state(moto.endpoint) == before


@pytest.mark.parametrize("entry", ENTRIES)
def test_wrong_credentials(entry: str, auth_moto: str) -> None:
    before = moto_objects(auth_moto)
    err = error_of(lambda: ENTRIES[entry]("s3://bucket/run", endpoint=auth_moto))
    assert isinstance(err, AccessDeniedError), repr(err)
    assert (
        "s3://bucket/run" in str(err) and "access denied" in str(err) and SECRET_KEY not in str(err)
    )
    assert moto_objects(auth_moto) == before


@pytest.mark.parametrize("entry", ENTRIES)
def test_unreachable_endpoint(entry: str) -> None:
    endpoint = closed_port_endpoint()
    err = error_of(lambda: ENTRIES[entry]("s3://bucket/run", endpoint=endpoint))
    assert isinstance(err, EndpointUnreachableError), repr(err)
    assert "s3://bucket/run" in str(err) and "cannot reach" in str(err)


# -- options -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda d: open_store(d, fsynk=True), TypeError, "unknown store options ['fsynk']"),
        (
            lambda d: open_store("s3://bucket/x", transport="http2"),
            ValueError,
            "unknown S3 transport 'http2'",
        ),
        (
            lambda d: open_store("s3://bucket/x", part_size=1 << 20),
            ValueError,
            "part_size must be at least 5 MiB",
        ),
        (
            lambda d: ShardWriter(d, object_size=1000),
            ValueError,
            "object_size must be at least 1 MiB",
        ),
        (lambda d: ShardWriter(d, num_threads=0), ValueError, "num_threads must be >= 1"),
        (lambda d: Checkpointer(d, keep_last=0), ValueError, "keep_last must be >= 1"),
        (
            lambda d: Checkpointer(d, when_busy="later"),
            ValueError,
            "when_busy must be 'wait' or 'skip'",
        ),
    ],
    ids=[
        "store-option-typo",
        "transport",
        "part-size",
        "object-size",
        "threads",
        "keep-last",
        "when-busy",
    ],
)
def test_bad_options(call: Callable[[str], Any], error: type, message: str, tmp_path: Path) -> None:
    err = error_of(lambda: call(str(tmp_path / "run")))
    assert isinstance(err, error) and message in str(err), repr(err)
    assert local_state(tmp_path) == []


# -- steps ---------------------------------------------------------------------------------
@pytest.fixture
def run5(tmp_path: Path) -> Iterator[Checkpointer]:
    """A Checkpointer whose root holds one committed step, 5."""
    with Checkpointer(tmp_path / "run") as ck:
        ck.save(5, {"w": torch.ones(3)}).wait()
        yield ck


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda ck: ck.save(-1, {"w": torch.ones(3)}), ValueError, "non-negative int, got -1"),
        (lambda ck: ck.save(True, {"w": torch.ones(3)}), ValueError, "got True"),
        (lambda ck: ck.save(2.0, {"w": torch.ones(3)}), ValueError, "got 2.0"),
        (
            lambda ck: ck.save(5, {"w": torch.ones(3)}),
            CheckpointExistsError,
            "step-0000000005 already exists",
        ),
        (
            lambda ck: ck.load({"w": torch.zeros(3)}, step=-1),
            ValueError,
            "non-negative int, got -1",
        ),
        (
            lambda ck: ck.load({"w": torch.zeros(3)}, step=7),
            CheckpointNotFoundError,
            "step-0000000007",
        ),
        (
            lambda ck: Checkpointer(ck.root_uri).save(5, {"w": torch.ones(3)}),
            CheckpointExistsError,
            "step-0000000005",
        ),
    ],
    ids=[
        "negative",
        "bool",
        "float",
        "duplicate",
        "load-negative",
        "load-missing",
        "duplicate-after-restart",
    ],
)
def test_bad_steps(
    run5: Checkpointer, call: Callable[[Checkpointer], Any], error: type, message: str
) -> None:
    root = Path(run5.root_uri)
    before = local_state(root)
    err = error_of(lambda: call(run5))
    assert isinstance(err, error) and message in str(err), repr(err)
    run5.wait()
    assert local_state(root) == before
    out = {"w": torch.zeros(3)}
    assert run5.load(out) == 5 and torch.equal(out["w"], torch.ones(3))


def test_bool_step_on_load_is_refused(run5: Checkpointer) -> None:
    with pytest.raises(ValueError, match="got True"):
        run5.load({"w": torch.zeros(3)}, step=True)


# -- values that cannot be saved -----------------------------------------------------------
def test_unpicklable_value_through_dcp(tmp_path: Path) -> None:
    uri = str(tmp_path / "ckpt")
    err = error_of(
        lambda: dcp.save(
            {"handle": threading.Lock(), "w": torch.ones(3)}, storage_writer=ShardWriter(uri)
        )
    )
    assert isinstance(err, SaveFailedError), repr(err)
    assert "'handle'" in str(err) and uri in str(err) and "cannot pickle" in str(err)
    assert local_state(tmp_path) == []


def test_unpicklable_value_through_checkpointer(run5: Checkpointer) -> None:
    root = Path(run5.root_uri)
    before = local_state(root)
    err = error_of(lambda: run5.save(6, {"lock": threading.Lock(), "w": torch.ones(3)}))
    assert isinstance(err, SaveFailedError) and "cannot pickle" in str(err), repr(err)
    run5.wait()
    assert local_state(root) == before and run5.steps() == [5]
    run5.save(6, {"w": torch.ones(3)}).wait()  # the failed save took nothing with it
    assert run5.steps() == [5, 6]


def test_unpicklable_value_through_checkpointer_names_the_key(run5: Checkpointer) -> None:
    err = error_of(lambda: run5.save(6, {"handle": threading.Lock(), "w": torch.ones(3)}))
    assert "handle" in str(err)


# -- a checkpoint of 2 ranks that cannot fill the state given ----------------------------------
@pytest.fixture(scope="module")
def two_rank_run(
    zygote: Zygote, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, int, float]:
    """A root with steps 1-3 saved by a 2-rank job (each rank wrote its share of the tensors)."""
    root, seed, mib = str(tmp_path_factory.mktemp("two-rank") / "run"), 7, 2.0
    zygote.send(op="job", job="two-rank", root=root, seed=seed, mib=mib)
    while (event := zygote.next_event(120))["event"] != "exited":
        pass
    assert event["status"] == [0, 0]
    return root, seed, mib


def test_two_rank_checkpoint_into_other_shapes(two_rank_run: tuple[str, int, float]) -> None:
    root, seed, mib = two_rank_run
    expected = crash_state(seed, 3, mib)
    before = local_state(Path(root))
    with Checkpointer(root) as ck:
        out = crash_state(0, 0, mib)
        assert ck.load(out) == 3  # 2 ranks -> 1 process: DCP reshards
        assert all(torch.equal(out["model"][k], expected["model"][k]) for k in expected["model"])
        wrong = crash_state(0, 0, mib)
        wrong["model"]["w1"] = torch.zeros(5)
        err = error_of(lambda: ck.load(wrong))
        assert isinstance(err, StateDictMismatchError), repr(err)
        assert (
            "model.w1: saved [" in str(err)
            and "given [5]" in str(err)
            and "step-0000000003" in str(err)
        )
        extra = crash_state(0, 0, mib) | {"new_head": torch.zeros(2)}
        err = error_of(lambda: ck.load(extra))
        assert isinstance(err, StateDictMismatchError) and "not in the checkpoint: new_head" in str(
            err
        )
    # Plain dcp.load: the planner's own error, naming the key.
    err = error_of(lambda: dcp.load(wrong, storage_reader=ShardReader(f"{root}/step-0000000003")))
    assert "model.w1" in str(err), repr(err)
    assert local_state(Path(root)) == before
