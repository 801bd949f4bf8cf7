"""Saves and loads through a proxy that injects S3 faults: 503 SlowDown, 500, resets, stalls,
truncated replies, lost replies and 200-with-<Error> on CompleteMultipartUpload.

Within the retry budget every save and load succeeds bit-exact; beyond it a save fails with one
clear error and nothing looks committed; an outage longer than the retry deadline fails the
save within that deadline and leaves no unfinished multipart upload; a failure on one rank
writes no manifest, names that rank on the other, and leaves only garbage that gc removes.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt import Checkpointer, SaveFailedError, ShardReader, ShardWriter
from shardckpt.errors import RetriesExhaustedError
from shardckpt.format.layout import MANIFEST_NAME
from shardckpt.retention.garbage import collect_garbage
from shardckpt.store import ObjectStore, RetryPolicy, open_store
from shardckpt.testing.servers import LocalS3Server
from tests.distributed import run_ranks
from tests.reliability.conftest import s3_options
from tests.reliability.fault_proxy import FaultProxy, Request, Rule, on
from tests.writer.states import assert_same, fingerprint, make_state

MiB = 1 << 20


def fault_mix() -> list[Rule]:
    """About a quarter of all requests fail, in every way the proxy knows."""
    return [
        Rule("slowdown", 0.06),
        Rule("internal", 0.04),
        Rule("reset", 0.03),
        Rule("reset_body", 0.04, match=lambda r: r.method in ("PUT", "POST")),
        Rule("truncate", 0.06, match=on("GET")),
        Rule("drop_reply", 0.03),
        Rule("stall", 0.02, limit=3),
        Rule("error_200", 0.3, match=lambda r: r.is_complete_multipart),
    ]


def big_state(seed: int, mib: int) -> dict[str, Any]:
    """make_state (every dtype, optimizer state, non-tensor values) plus ``mib`` MiB of floats,
    so a save spans many objects (and many requests)."""
    state = make_state(seed, 1)
    g = torch.Generator().manual_seed(seed + 7)
    state["big"] = torch.randn(mib * MiB // 4, generator=g)
    return state


def _cause(exc: BaseException) -> BaseException:
    assert isinstance(exc, CheckpointException), exc
    assert len(exc.failures) == 1, f"expected one failing rank, got {sorted(exc.failures)}"
    return next(iter(exc.failures.values()))[0]


def _data_keys(store: ObjectStore, prefix: str) -> list[str]:
    return [o.key for o in store.list(prefix) if not o.key.endswith(MANIFEST_NAME)]


# -- within the retry budget: everything succeeds, bit-exact -------------------------------
@pytest.mark.parametrize("upload", ["single", "multipart"])
def test_dcp_save_and_load_survive_faults(
    proxy: FaultProxy, bucket: str, direct: ObjectStore, upload: str
) -> None:
    # The first CompleteMultipartUpload surely gets a 200 with an <Error>, later ones by chance.
    proxy.set_rules(
        [Rule("error_200", match=lambda r: r.is_complete_multipart, limit=1), *fault_mix()]
    )
    if upload == "single":
        opts = s3_options(proxy.endpoint)
        writer_opts: dict[str, Any] = {"object_size": 1 * MiB, "num_threads": 4}
        mib, rounds = 10, 2
    else:
        opts = s3_options(
            proxy.endpoint, multipart_threshold=5 * MiB, part_size=5 * MiB, max_concurrency=3
        )
        writer_opts = {"object_size": 11 * MiB, "num_threads": 2}
        mib, rounds = 30, 1
    for r in range(rounds):
        uri = f"s3://{bucket}/ckpt{r}"
        state = big_state(r, mib)
        writer = ShardWriter(uri, **writer_opts, **opts)
        dcp.save(state, storage_writer=writer)
        loaded = big_state(100 + r, mib)
        reader = ShardReader(uri, num_threads=4, **opts)
        dcp.load(loaded, storage_reader=reader)
        assert_same(loaded, state)
        assert writer.store.stats.retries + reader.store.stats.retries > 0
    if upload == "multipart":
        completes = list(proxy.requests_matching(lambda r: r.is_complete_multipart))
        assert any(f == "error_200" for *_, f in completes) and any(
            f is None for *_, f in completes
        )
    least = {"single": (60, 8), "multipart": (20, 2)}[upload]
    assert proxy.requests >= least[0] and proxy.total_faults >= least[1], (
        proxy.requests,
        proxy.faults,
    )
    # Lost replies to CreateMultipartUpload leave uploads nobody knows about: gc's job.
    collect_garbage(direct, grace_s=0)
    assert list(direct.list_pending_uploads()) == []


@pytest.mark.parametrize("transport", ["boto3", "crt"])
def test_checkpointer_survives_faults_and_gc_keeps_committed_data(
    proxy: FaultProxy, bucket: str, direct: ObjectStore, transport: str
) -> None:
    proxy.set_rules(fault_mix())
    uri = f"s3://{bucket}/run"
    expected = {}
    opts = s3_options(proxy.endpoint, transport=transport)
    with Checkpointer(uri, object_size=1 * MiB, num_threads=4, **opts) as ck:
        state = big_state(0, 6)
        for step in (1, 2, 3):
            state["big"].add_(1.0)
            state["t_int32"].mul_(3)
            expected[step] = fingerprint(state)
            ck.save(step, state)
        ck.wait()
        assert ck.steps() == [1, 2, 3]
        report = ck.gc(grace_s=0)
        assert report is not None
        assert not any(MANIFEST_NAME in key for key in report.garbage_objects)
        for step in (1, 2, 3):
            out = big_state(50, 6)
            assert ck.load(out, step=step) == step
            assert fingerprint(out) == expected[step], f"step {step} is not bit-exact"
    assert proxy.total_faults >= 5, proxy.faults
    assert list(direct.list_pending_uploads()) == []


def test_lost_reply_to_the_commit_is_still_a_commit(proxy: FaultProxy, bucket: str) -> None:
    """The manifest PUT reaches the server but its reply is lost: the retry's conditional put
    finds the manifest. It is this save's own, so the save has committed (not lost a race)."""
    proxy.set_rules([Rule("drop_reply", match=on("PUT", path=MANIFEST_NAME), limit=1)])
    uri = f"s3://{bucket}/ckpt"
    state = big_state(4, 1)
    dcp.save(state, storage_writer=ShardWriter(uri, **s3_options(proxy.endpoint)))
    assert proxy.faults["drop_reply"] == 1
    puts = list(proxy.requests_matching(on("PUT", path=MANIFEST_NAME)))
    assert len(puts) == 2, puts  # the lost one, and the retry that found it
    loaded = big_state(5, 1)
    dcp.load(loaded, storage_reader=ShardReader(uri, **s3_options(proxy.endpoint)))
    assert_same(loaded, state)


# -- beyond the retry budget: one clear error, nothing committed ----------------------------
@pytest.mark.parametrize(
    "transport, kind",
    [("boto3", "slowdown"), ("boto3", "internal"), ("boto3", "reset"), ("crt", "internal")],
)
def test_dcp_save_beyond_retry_budget_fails_with_one_clear_error(
    proxy: FaultProxy, bucket: str, direct: ObjectStore, transport: str, kind: str
) -> None:
    proxy.set_rules([Rule(kind, match=on("PUT", path="/rank0-000001"))])
    retry = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)
    uri = f"s3://{bucket}/ckpt"
    opts = s3_options(proxy.endpoint, retry, transport=transport)
    with pytest.raises(CheckpointException) as info:
        dcp.save(big_state(1, 3), storage_writer=ShardWriter(uri, object_size=1 * MiB, **opts))
    err = _cause(info.value)
    assert isinstance(err, RetriesExhaustedError), repr(err)
    message = str(err)
    assert "gave up after 3 attempts" in message and f"s3://{bucket}/ckpt/attempt-" in message
    assert "/rank0-000001" in message
    cause = {
        ("boto3", "slowdown"): "SlowDown",
        ("boto3", "internal"): "InternalError",
        ("boto3", "reset"): "Connection",
        ("crt", "internal"): "internal server error",
    }[transport, kind]
    assert cause in message
    assert direct.head(f"ckpt/{MANIFEST_NAME}") is None
    # boto3 sends each attempt once; the CRT retries inside each of our attempts as well.
    assert proxy.faults[kind] == 3 if transport == "boto3" else proxy.faults[kind] >= 3


def test_checkpointer_beyond_retry_budget_surfaces_once_and_commits_nothing(
    proxy: FaultProxy, bucket: str, direct: ObjectStore
) -> None:
    uri = f"s3://{bucket}/run"
    retry = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)
    with Checkpointer(uri, object_size=1 * MiB, **s3_options(proxy.endpoint, retry)) as ck:
        ck.save(1, big_state(1, 2)).wait()
        proxy.set_rules([Rule("slowdown", match=on("PUT", path="step-0000000002/"))])
        ck.save(2, big_state(2, 2))
        with pytest.raises(SaveFailedError) as info:
            ck.wait()
        message = str(info.value)
        assert "save of step 2" in message and f"s3://{bucket}/run/step-0000000002" in message
        assert "gave up after 3 attempts" in message and "SlowDown" in message
        assert message.count("gave up") == 1, "one error, not one per object"
        assert ck.steps() == [1] and ck.latest() == 1
        assert direct.head(f"run/step-0000000002/{MANIFEST_NAME}") is None
        ck.wait()  # raised once, not again
        proxy.set_rules([])
        state3 = big_state(3, 2)
        ck.save(3, state3).wait()
        assert ck.steps() == [1, 3]
        out = big_state(9, 2)
        ck.load(out)
        assert_same(out, state3)


def test_complete_multipart_200_with_error_is_a_failure(
    proxy: FaultProxy, bucket: str, direct: ObjectStore
) -> None:
    """S3 may answer CompleteMultipartUpload with 200 and an <Error> body: the object was not
    written, so the save must fail, abort its uploads and commit nothing."""
    proxy.set_rules([Rule("error_200", match=lambda r: r.is_complete_multipart)])
    retry = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)
    opts = s3_options(proxy.endpoint, retry, multipart_threshold=5 * MiB, part_size=5 * MiB)
    uri = f"s3://{bucket}/run"
    with Checkpointer(uri, object_size=12 * MiB, num_threads=1, **opts) as ck:
        ck.save(1, {"w": torch.randn(3 * MiB)})  # 12 MiB: one object of 3 parts
        with pytest.raises(SaveFailedError) as info:
            ck.wait()
        message = str(info.value)
        assert (
            "CompleteMultipartUpload" in message
            and "InternalError" in message
            and "step-0000000001" in message
        )
        assert ck.steps() == []
    assert list(direct.list("run/")) == []
    assert list(direct.list_pending_uploads()) == []
    # Multipart really was used: 3 parts, then 3 attempts to complete, each a 200 with <Error>.
    assert len(list(proxy.requests_matching(lambda r: r.is_upload_part))) == 3
    assert [f for *_, f in proxy.requests_matching(lambda r: r.is_complete_multipart)] == [
        "error_200"
    ] * 3


@pytest.mark.parametrize("start", ["before_save", "mid_upload"])
def test_outage_longer_than_deadline_fails_within_it(
    proxy: FaultProxy, bucket: str, direct: ObjectStore, start: str
) -> None:
    """503 to every request for longer than the retry deadline: the save fails within about
    the deadline (not once per object), and no multipart upload is left unfinished."""
    deadline = 2.0
    retry = RetryPolicy(max_attempts=1000, base_delay=0.02, max_delay=0.1, deadline=deadline)
    opts = s3_options(
        proxy.endpoint, retry, multipart_threshold=5 * MiB, part_size=5 * MiB, max_concurrency=2
    )
    uri = f"s3://{bucket}/run"
    with Checkpointer(uri, object_size=10 * MiB, num_threads=2, **opts) as ck:
        ck.save(1, {"w": torch.ones(4)}).wait()
        outage = Rule("slowdown", duration=1.5 * deadline)
        if start == "mid_upload":  # once the first part of the first object is stored
            outage.armed_by = lambda r: r.is_upload_part
        else:
            outage.arm(time.monotonic())
        proxy.set_rules([outage])
        started = time.monotonic()
        ck.save(2, {"w": torch.randn(20 * MiB)})  # 80 MiB: 8 objects of 2 parts
        with pytest.raises(SaveFailedError, match="gave up after") as info:
            ck.wait()
        elapsed = time.monotonic() - started
        assert outage.armed_at is not None and elapsed < 2 * deadline + 1.0, (
            f"failed after {elapsed:.1f}s"
        )
        assert "503" in str(info.value) and str(info.value).count("gave up") == 1
        time.sleep(max(0.0, outage.armed_at + outage.duration - time.monotonic()))  # type: ignore[operator]
        assert ck.steps() == [1]
    assert direct.head(f"run/step-0000000002/{MANIFEST_NAME}") is None
    assert list(direct.list_pending_uploads()) == []
    if start == "mid_upload":
        assert list(proxy.requests_matching(lambda r: r.is_upload_part and r.method == "PUT"))


# -- a failure on one rank of two ------------------------------------------------------------
def plain_state(seed: int) -> dict[str, Any]:
    """Plain tensors every rank holds alike: DCP writes each once, spread over both ranks."""
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(MiB // 4, generator=g) for i in range(4)} | {
        "meta": {"seed": seed}
    }


def _save_two_steps(rank: int, world_size: int, uri: str, options: dict[str, Any]) -> str | None:
    with Checkpointer(uri, object_size=1 * MiB, **options) as ck:
        ck.save(1, plain_state(1)).wait()
        ck.save(2, plain_state(2))
        try:
            ck.wait()
        except SaveFailedError as exc:
            return str(exc)
    return None


@pytest.mark.slow
def test_failure_on_one_rank_commits_nothing_and_names_the_rank(
    proxy: FaultProxy, bucket: str, direct: ObjectStore, moto: LocalS3Server
) -> None:
    def rank1_step2(r: Request) -> bool:
        return r.method == "PUT" and "step-0000000002/" in r.path and "/rank1-" in r.path

    proxy.set_rules([Rule("slowdown", match=rank1_step2)])
    retry = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)
    uri = f"s3://{bucket}/run"
    errors = run_ranks(_save_two_steps, 2, uri, s3_options(proxy.endpoint, retry))
    assert all(e is not None for e in errors), errors
    assert (
        "rank 1: RetriesExhaustedError" in errors[0]
        and "/rank1-" in errors[0]
        and "rank 0:" not in errors[0]
    )
    assert direct.head(f"run/step-0000000002/{MANIFEST_NAME}") is None
    orphans = _data_keys(direct, "run/step-0000000002/")
    assert any("/rank0-" in k for k in orphans), orphans  # rank 0 did upload its share
    assert any("/rank1-" in k for k in _data_keys(direct, "run/step-0000000001/"))
    committed = set(_data_keys(direct, "run/step-0000000001/"))

    report = collect_garbage(open_store(uri, endpoint=moto.endpoint), grace_s=0)
    assert sorted(k.split(f"s3://{bucket}/run/")[1] for k in report.garbage_objects) == sorted(
        k.removeprefix("run/") for k in orphans
    )
    assert _data_keys(direct, "run/step-0000000002/") == []
    assert set(_data_keys(direct, "run/step-0000000001/")) == committed
    with Checkpointer(uri, endpoint=proxy.endpoint) as ck:
        assert ck.steps() == [1]
        out = {
            k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
            for k, v in plain_state(1).items()
        }
        out["meta"] = {"seed": -1}
        ck.load(out)
        assert_same(out, plain_state(1))
