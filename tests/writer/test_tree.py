"""The one state-dict walker (``_util/tree.py``), used by staging and by the whole-object
load, and what the load does with it on the local store and on S3 (moto)."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch

import shardckpt
from shardckpt._util.tree import map_leaves, tensor_leaves
from shardckpt.dcp.staging import HostStaging


class Pair(NamedTuple):
    tensor: torch.Tensor
    count: int


def _state() -> dict[str, Any]:
    return {
        "w": torch.arange(4.0),
        "nested": {"layers": [torch.ones(2), (torch.zeros(3), "tag")]},
        "pair": Pair(torch.full((2,), 7.0), 3),
        "step": 5,
    }


def test_walker_maps_tensor_leaves_by_path_and_keeps_named_tuples_whole() -> None:
    state = _state()
    assert list(tensor_leaves(state)) == [
        ("w",),
        ("nested", "layers", 0),
        ("nested", "layers", 1, 0),
    ]
    doubled = map_leaves(state, lambda _, t: t * 2, lambda path, v: (path, v))
    assert torch.equal(doubled["nested"]["layers"][1][0], torch.zeros(3))
    assert doubled["nested"]["layers"][1][1] == (("nested", "layers", 1, 1), "tag")
    assert doubled["pair"] == (("pair",), state["pair"]) and doubled["step"] == (("step",), 5)
    assert isinstance(doubled["nested"]["layers"][1], tuple)


def test_snapshot_stages_every_tensor_and_copies_the_rest() -> None:
    state, staging = _state(), HostStaging(pin_memory=False)
    staged = staging.snapshot(state)
    state["w"].add_(1)
    state["nested"]["layers"][0].add_(1)
    assert torch.equal(staged["w"], torch.arange(4.0))
    assert torch.equal(staged["nested"]["layers"][0], torch.ones(2))
    assert staged["pair"] is not state["pair"] and staged["pair"].count == 3
    assert torch.equal(staged["pair"].tensor, state["pair"].tensor)
    staging.close()


@pytest.fixture(params=["local", "moto-boto3"])
def target(request: pytest.FixtureRequest, tmp_path) -> Any:  # type: ignore[no-untyped-def]
    from tests.conftest import make_target

    return make_target(request.param, request, tmp_path)


def test_load_to_a_device_moves_tensors_and_keeps_named_tuples(target: Any) -> None:
    uri = f"{target.uri}/whole"
    shardckpt.save(_state(), uri, **target.options)
    back = shardckpt.load(uri, map_location="cpu", trusted=True, **target.options)
    expected = _state()
    assert torch.equal(back["w"], expected["w"]) and back["step"] == 5
    assert torch.equal(back["nested"]["layers"][1][0], torch.zeros(3))
    assert isinstance(back["pair"], Pair) and torch.equal(
        back["pair"].tensor, expected["pair"].tensor
    )
