"""Each item is checked by the GET that completes it, while the others run: a corrupt object
fails the load at its own GET, and the GETs queued behind it are not sent (the checks used
to be a serial phase after the last GET: issue 16)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt import ChecksumMismatchError, ShardReader, ShardWriter
from tests.conftest import make_target

MiB = 1 << 20


@pytest.mark.parametrize("name", ["local", "moto-boto3"])
def test_a_corrupt_object_fails_the_load_before_the_gets_behind_it(  # type: ignore[no-untyped-def]
    name: str, request: pytest.FixtureRequest, tmp_path
) -> None:
    target = make_target(name, request, tmp_path)
    uri = f"{target.uri}/ckpt"
    state = {f"t{i}": torch.full((MiB // 4,), float(i)) for i in range(8)}
    dcp.save(state, storage_writer=ShardWriter(uri, object_size=MiB, **target.options))
    store = target.open()
    keys = [o.key for o in store.list("ckpt/") if "/attempt-" in o.key]
    assert len(keys) == 8
    for key in keys:  # every object: whichever GET goes first meets a bad one
        data = bytearray(store.get(key))
        data[100] ^= 0xFF
        store.put(key, [data])
    reader = ShardReader(uri, num_threads=1, **target.options)
    with pytest.raises(CheckpointException) as info:
        dcp.load({k: torch.empty_like(v) for k, v in state.items()}, storage_reader=reader)
    error = next(iter(info.value.failures.values()))[0]
    assert isinstance(error, ChecksumMismatchError) and "ckpt/attempt-" in str(error)
    # One thread: the bad GET, and at most the one the thread took up before the failure was
    # seen; not all eight.
    assert reader.store.stats.bytes_got <= 2 * MiB, "the GETs queued behind the bad one were sent"
