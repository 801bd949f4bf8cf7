"""Long commands (verify, cp, export) show a progress bar (bytes, rate, ETA) on a terminal and
nothing when piped; the library reports progress through a callback and never prints."""

from __future__ import annotations

import re

import pytest
import torch

import shardckpt
from shardckpt.format.layout import Layout
from shardckpt.store import open_store
from shardckpt.tools.verify import verify_checkpoint
from tests.cli.run import shardckpt as run_cli
from tests.cli.run import shardckpt_on_a_terminal
from tests.conftest import Target, make_target

STATE = {"w": torch.randn(3 << 20), "b": torch.randn(1 << 18)}  # 13 MiB in 2 objects


@pytest.fixture(params=["local", "moto-boto3"])
def saved(request: pytest.FixtureRequest, tmp_path) -> Target:  # type: ignore[no-untyped-def]
    target = make_target(request.param, request, tmp_path)
    shardckpt.save(STATE, target.uri, object_size=8 << 20, **target.options)
    return target


def _commands(target: Target, out: str) -> dict[str, list[str]]:
    endpoint = target.options.get("endpoint")
    common = ["--endpoint", str(endpoint)] if endpoint else []
    return {
        "verify": ["verify", target.uri, *common],
        "cp": ["cp", target.uri, f"{out}/copy", *common],
        "export": ["export", target.uri, f"{out}/model.pt", *common],
    }


# tqdm's meter: "13.0M/13.0M [00:00<00:00, 51.2MiB/s]": bytes done/total, elapsed<ETA, rate.
BAR = re.compile(r"100%\|.*\| *13\.0M/13\.0M \[\d\d:\d\d<\d\d:\d\d, +[\d.]+[kMG]?iB/s\]")


def test_a_bar_on_a_terminal(saved: Target, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """verify and export printed nothing until done (8 s for 1 GiB); cp counted objects."""
    for name, args in _commands(saved, str(tmp_path / "tty")).items():
        done = shardckpt_on_a_terminal(*args)
        assert done.code == 0, f"{name}: {done.err}"
        assert BAR.search(done.err), f"{name}: no bar on the terminal: {done.err!r}"
        assert done.out.strip() and "\r" not in done.out, name  # the result, on stdout


def test_no_bar_when_piped(saved: Target, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name, args in _commands(saved, str(tmp_path / "piped")).items():
        done = run_cli(*args)
        assert done.code == 0 and done.err == "", f"{name}: {done.err!r}"
        assert done.out.strip() and "\r" not in done.out, name


def test_verify_reports_every_byte_through_its_callback(saved: Target) -> None:
    store = open_store(saved.uri, **saved.options)
    calls: list[tuple[int, int]] = []
    report = verify_checkpoint(store, Layout(), on_bytes=lambda n, total: calls.append((n, total)))
    assert report.ok and sum(n for n, _ in calls) == report.bytes
    assert {total for _, total in calls} == {report.bytes}


def test_load_reports_its_bytes_through_its_callback(saved: Target) -> None:
    calls: list[tuple[int, int]] = []
    state = shardckpt.load(
        saved.uri, on_bytes=lambda n, total: calls.append((n, total)), **saved.options
    )
    assert torch.equal(state["w"], STATE["w"])
    total = calls[-1][1]
    assert total >= 13 << 20 and sum(n for n, _ in calls) == total
