"""A writer and a reader for one checkpoint of an open store (as the Checkpointer and the
Lightning plugin make them) go through ``__init__`` like any other, on the local store and
on S3 (moto); the options split the same way everywhere."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from shardckpt import ShardReader, ShardWriter
from shardckpt._util.quiet import single_process_dcp
from shardckpt.dcp.writer import WriterOptions, split_options
from shardckpt.format.layout import Layout
from shardckpt.format.manifest import read_manifest
from shardckpt.store import open_store


@pytest.fixture(params=["local", "moto-boto3"])
def opened(request: pytest.FixtureRequest, tmp_path) -> Any:  # type: ignore[no-untyped-def]
    from tests.conftest import make_target

    target = make_target(request.param, request, tmp_path)
    store = target.open()
    yield store, target
    store.close()


def test_for_checkpoint_writes_and_reads_through_the_open_store(opened: Any) -> None:
    store, target = opened
    layout, uri = Layout("step-1"), store.uri("step-1")
    options = WriterOptions(object_size=1 << 20, num_threads=2)
    writer = ShardWriter.for_checkpoint(store, layout, uri, {"step": 1}, options)
    assert writer.store is store and writer.options == options
    assert set(vars(writer)) == set(vars(ShardWriter(target.uri, **target.options)))
    state = {"w": torch.arange(12.0).reshape(3, 4), "epoch": 3}
    with single_process_dcp():
        dcp.save(state, storage_writer=writer, no_dist=True)
    assert read_manifest(store, layout).attributes == {"step": 1}

    reader = ShardReader.for_checkpoint(store, layout, uri, num_threads=2)
    assert reader.store is store and reader.num_threads == 2
    assert set(vars(reader)) == set(vars(ShardReader(target.uri, **target.options)))
    loaded = {"w": torch.zeros(3, 4), "epoch": 0}
    with single_process_dcp():
        dcp.load(loaded, storage_reader=reader, no_dist=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["epoch"] == 3


def test_store_options_beside_an_open_store_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = open_store(tmp_path)
    with pytest.raises(TypeError, match="endpoint"):
        ShardWriter(store.uri("a"), store=store, endpoint="http://127.0.0.1:1")
    with pytest.raises(TypeError, match="region"):
        ShardReader(store.uri("a"), store=store, region="x")


def test_split_options_parts_writer_and_store_options() -> None:
    options = {"object_size": 2 << 20, "fanout": 4, "endpoint": "http://127.0.0.1:1"}
    assert split_options(options) == (
        WriterOptions(object_size=2 << 20, fanout=4),
        {"endpoint": "http://127.0.0.1:1"},
    )


def test_a_reset_elsewhere_lets_go_of_a_given_store_without_closing_it(opened: Any) -> None:
    """The store a Checkpointer shares stays usable when DCP points its writer or reader at
    another checkpoint; the writer and reader then open their own."""
    store, _ = opened
    writer = ShardWriter(store.uri("step-1"), store=store)
    reader = ShardReader(store.uri("step-1"), store=store)
    writer.reset(store.uri("step-2"))
    reader.reset(store.uri("step-2"))
    assert writer.uri == reader.uri == store.uri("step-2")
    assert writer.store is not store and reader.store is not store
    # Above S3's multipart threshold: the upload needs the store's part pool, which close() stops.
    config = getattr(store, "config", None)
    data = b"x" * ((config.multipart_threshold if config else 0) + 1)
    store.put("still-open", [data])
    assert bytes(store.get("still-open")) == data
