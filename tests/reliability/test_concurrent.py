"""Two jobs (processes) commit the same checkpoint at the same time: exactly one wins, the
other gets CheckpointExistsError, and the manifest holds the winner's shards only.

In half of the rounds both jobs are held at a barrier after uploading, right before the
commit, so both have passed the early existence check and race on the conditional put of
the manifest itself; in the other half they race freely from the start.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt import ShardReader, ShardWriter
from shardckpt.errors import ConditionalPutUnsupportedError
from shardckpt.format.layout import Layout
from shardckpt.format.manifest import read_manifest
from shardckpt.retention.garbage import collect_garbage
from shardckpt.store import ObjectStore, open_store
from shardckpt.testing.servers import LocalS3Server
from shardckpt.tools.verify import verify_checkpoint
from tests.reliability.workers import Zygote, race_state
from tests.writer.states import fingerprint


def _other_data(store: ObjectStore, layout: Layout, attempt: str) -> list[str]:
    """Data of the checkpoint at ``layout`` that is not of ``attempt``."""
    keys = [o.key for o in store.list(layout.data_prefix) if o.key != layout.manifest_key]
    return [k for k in keys if k.removeprefix(layout.data_prefix).split("/")[0] != attempt]


@pytest.mark.slow
def test_two_jobs_commit_the_same_checkpoint(
    zygote: Zygote, tmp_path: Path, moto: LocalS3Server
) -> None:
    bucket = f"race-{uuid.uuid4().hex[:10]}"
    moto.create_bucket(bucket)
    targets = [(str(tmp_path / "local"), {}), (f"s3://{bucket}/run", {"endpoint": moto.endpoint})]
    rounds = [
        (f"{root}/ckpt{i}", options, i % 2 == 0) for root, options in targets for i in range(6)
    ]
    zygote.send(op="race", rounds=rounds)
    outcomes: dict[tuple[int, int], tuple[str, str]] = {}
    while len(outcomes) < 2 * len(rounds):
        event = zygote.expect("round", timeout=120)
        outcomes[event["job"], event["round"]] = (event["outcome"], event["detail"])
    assert zygote.expect("exited")["status"] == [0, 0]

    at_commit = 0
    for i, (uri, options, held) in enumerate(rounds):
        results = {job: outcomes[job, i] for job in (1, 2)}
        winners = [job for job, (kind, _) in results.items() if kind == "won"]
        assert len(winners) == 1, f"round {i} ({uri}): {results}"
        winner, attempt = winners[0], results[winners[0]][1]
        kind, message = results[3 - winner]
        assert kind == "CheckpointExistsError" and "manifest.json" in message, results
        at_commit += "another writer committed first" in message
        if held:
            assert "another writer committed first" in message, "both passed the early check"

        root, name = uri.rsplit("/", 1)
        store, layout = open_store(root, **options), Layout(name)
        attempts = {o.key.split("/")[0] for o in read_manifest(store, layout).objects}
        assert attempts == {attempt}, f"round {i}: the manifest mixes attempts {attempts}"
        if held:
            assert _other_data(store, layout, attempt), "the loser uploaded before losing"
        # The loser's data is garbage; gc (rooted at this checkpoint) removes exactly that.
        collect_garbage(open_store(uri, **options), grace_s=0)
        assert _other_data(store, layout, attempt) == []
        assert verify_checkpoint(store, layout).ok
        out = race_state(0, 0)
        out["meta"] = {"job": -1}
        dcp.load(out, storage_reader=ShardReader(uri, **options))
        assert fingerprint(out) == fingerprint(race_state(winner, i)), (
            f"round {i}: not the winner's state"
        )
        store.close()
    print(f"\n{len(rounds)} rounds, {at_commit} decided by the conditional put of the manifest")
    assert at_commit >= len(rounds) // 2


def test_a_server_ignoring_if_none_match_is_refused_unless_accepted(
    rclone: LocalS3Server, moto: LocalS3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """rclone's serve s3 ignores If-None-Match, so there the last writer would silently win:
    the commit is refused, naming the endpoint, unless the risk is accepted (a WARNING).
    Servers that honour it (moto) and the local store commit as before, without a warning."""
    state = {"w": torch.arange(10.0)}
    bucket = f"noinm-{uuid.uuid4().hex[:10]}"
    rclone.create_bucket(bucket)
    uri = f"s3://{bucket}/ckpt"
    with pytest.raises(CheckpointException) as info:
        dcp.save(state, storage_writer=ShardWriter(uri, endpoint=rclone.endpoint))
    (err,) = [e for e, _ in info.value.failures.values()]
    assert isinstance(err, ConditionalPutUnsupportedError), err
    assert rclone.endpoint in str(err) and "If-None-Match" in str(err)
    assert "unsafe_unconditional_commit=True" in str(err)
    store = open_store(uri, endpoint=rclone.endpoint)
    assert list(store.list()) == [], "refused before the upload: nothing written"

    accepted = f"s3://{bucket}/accepted"
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        dcp.save(
            state,
            storage_writer=ShardWriter(
                accepted, endpoint=rclone.endpoint, unsafe_unconditional_commit=True
            ),
        )
    assert any(
        r.levelno == logging.WARNING and rclone.endpoint in r.getMessage() for r in caplog.records
    )
    out = {"w": torch.zeros(10)}
    dcp.load(out, storage_reader=ShardReader(accepted, endpoint=rclone.endpoint))
    assert torch.equal(out["w"], state["w"])

    caplog.clear()
    moto_bucket = f"inm-{uuid.uuid4().hex[:10]}"
    moto.create_bucket(moto_bucket)
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        for where, options in (
            (f"s3://{moto_bucket}/ckpt", {"endpoint": moto.endpoint}),
            (str(tmp_path / "ckpt"), {}),
        ):
            dcp.save(state, storage_writer=ShardWriter(where, **options))
    assert not caplog.records
    moto_store = open_store(f"s3://{moto_bucket}", endpoint=moto.endpoint)
    assert [o.key for o in moto_store.list() if "probe" in o.key] == [], "the probe is deleted"
