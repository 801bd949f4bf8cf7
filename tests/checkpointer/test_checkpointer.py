"""The Checkpointer in a training loop: async saves, exact loads, bounded memory, retention,
errors that surface, and DCP's async_save with our stager."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

from shardckpt import (
    Checkpointer,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    PinnedStager,
    SaveFailedError,
    ShardReader,
    ShardWriter,
    StateDictMismatchError,
)
from shardckpt.store import open_store
from tests.conftest import make_target
from tests.distributed import run_ranks
from tests.writer.states import fingerprint


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024)
        )
        self.head = torch.nn.Linear(1024, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _state(
    model: Toy, opt: torch.optim.Optimizer, sharded: torch.Tensor, step: int
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "sharded": sharded,
        "meta": {"step": step},
    }


def _train_and_save(
    rank: int, world_size: int, uri: str, options: dict[str, Any]
) -> dict[str, float]:
    torch.manual_seed(0)
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mesh = init_device_mesh("cpu", (world_size,))
    sharded = distribute_tensor(torch.zeros(64, 256), mesh, [Shard(0)])
    expected: dict[int, dict[str, Any]] = {}  # fingerprints: clones would dwarf the RSS check
    rss: dict[int, float] = {}
    with Checkpointer(uri, **options) as ck:
        for step in range(1, 21):
            x = torch.randn(16, 64)
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            sharded.add_(1.0)
            # The training's own collectives on the default group while a save runs in the
            # background: they must not interleave with the save's (a dedicated group).
            dist.all_reduce(torch.ones(1))
            dist.barrier()
            state = _state(model, opt, sharded, step)
            expected[step] = fingerprint(state)
            ck.save(step, state)
            if step in (2, 20):
                ck.wait()
                rss[step] = _rss_mib()
        ck.wait()
        assert ck.steps() == list(range(1, 21))
        assert ck.staging.nbytes > 0
        for step in (1, 7, 20):
            torch.manual_seed(123)
            fresh_model, fresh_sharded = (
                Toy(),
                distribute_tensor(torch.full((64, 256), -1.0), mesh, [Shard(0)]),
            )
            fresh_opt = torch.optim.Adam(fresh_model.parameters(), lr=1e-3)
            fresh_model(torch.randn(2, 64)).sum().backward()
            fresh_opt.step()  # creates the optimizer state to load into
            fresh = _state(fresh_model, fresh_opt, fresh_sharded, -1)
            assert ck.load(fresh, step=step) == step
            assert fingerprint(fresh) == expected[step], f"step {step} did not load bit-exact"
    return rss


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "moto-boto3"])
def test_twenty_async_saves_while_training(
    backend: str, request: pytest.FixtureRequest, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    target = make_target(backend, request, tmp_path)
    results = run_ranks(_train_and_save, 2, f"{target.uri}/run", target.options)
    for rss in results:
        # Staging holds one copy of the state (~9 MiB here); a buffer per save would add
        # ~160 MiB over 18 saves.
        assert rss[20] <= rss[2] * 1.05, f"RSS grew from {rss[2]:.0f} MiB to {rss[20]:.0f} MiB"


def test_retention_keeps_exactly_n(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with Checkpointer(tmp_path / "run", keep_last=3) as ck:
        for step in range(7):
            ck.save(step, {"w": torch.full((4,), float(step))})
        ck.wait()
        assert ck.steps() == [4, 5, 6]
        assert sorted(os.listdir(tmp_path / "run")) == [
            "step-0000000004",
            "step-0000000005",
            "step-0000000006",
        ]
        out = {"w": torch.zeros(4)}
        assert ck.load(out) == 6 and torch.equal(out["w"], torch.full((4,), 6.0))


@pytest.mark.parametrize("surfaces_on", ["save", "wait", "close"])
def test_background_failure_surfaces_on_next_call(tmp_path, surfaces_on: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "run"
    ck = Checkpointer(root)
    ck.save(1, {"w": torch.ones(3)}).wait()
    (root / "step-0000000002").write_text("a file where the checkpoint's folder must go")
    handle = ck.save(2, {"w": torch.ones(3)})  # the snapshot succeeds; the upload cannot
    with pytest.raises(SaveFailedError, match="step 2") as info:
        if surfaces_on == "save":
            while not handle.done():
                pass
            ck.save(3, {"w": torch.ones(3)})
        elif surfaces_on == "wait":
            ck.wait()
        else:
            ck.close()
    assert "step-0000000002" in str(info.value)
    ck.close()  # the error was raised once; closing again is clean
    assert Checkpointer(root).steps() == [1]


def test_bad_steps_and_state_dicts_get_clear_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with Checkpointer(tmp_path / "run") as ck:
        with pytest.raises(CheckpointNotFoundError):
            ck.load({"w": torch.zeros(3)})
        with pytest.raises(ValueError, match="non-negative"):
            ck.save(-1, {"w": torch.ones(3)})
        ck.save(5, {"w": torch.ones(3)}).wait()
        with pytest.raises(CheckpointExistsError, match="step-0000000005"):
            ck.save(5, {"w": torch.ones(3)})
        with pytest.raises(StateDictMismatchError, match="shape"):
            ck.load({"w": torch.zeros(4)})
        with pytest.raises(StateDictMismatchError, match="not in the checkpoint: v"):
            ck.load({"w": torch.zeros(3), "v": torch.zeros(1)})
        with pytest.raises(CheckpointNotFoundError):
            ck.load({"w": torch.zeros(3)}, step=6)
    with Checkpointer(tmp_path / "run") as again:  # a restarted job sees step 5 as taken
        with pytest.raises(CheckpointExistsError):
            again.save(5, {"w": torch.ones(3)})


def test_staging_memory_is_reused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = {"a": torch.randn(256, 256), "b": [torch.randn(100)]}
    with Checkpointer(tmp_path / "run") as ck:
        sizes = []
        for step in range(4):
            ck.save(step, state)
            sizes.append(ck.staging.nbytes)
            state["a"].add_(1)
        assert sizes == [sizes[0]] * 4 and sizes[0] == (256 * 256 + 100) * 4


def test_snapshot_is_isolated_from_later_updates(tmp_path) -> None:  # type: ignore[no-untyped-def]
    w = torch.zeros(1 << 20)
    with Checkpointer(tmp_path / "run") as ck:
        ck.save(1, {"w": w})
        w.add_(1)  # training goes on while the upload runs
        ck.wait()
        out = {"w": torch.full_like(w, 5.0)}
        ck.load(out, step=1)
    assert torch.equal(out["w"], torch.zeros(1 << 20))


def test_dcp_async_save_with_pinned_stager(tmp_path) -> None:  # type: ignore[no-untyped-def]
    uri = str(tmp_path / "ckpt")
    state = {"w": torch.randn(300, 7), "n": {"epoch": 3}}
    stager = PinnedStager()
    future = dcp.async_save(state, storage_writer=ShardWriter(uri), async_stager=stager)
    state["w"].zero_()  # staged already: must not leak into the checkpoint
    future.result()
    stager.close()
    out = {"w": torch.empty(300, 7), "n": {"epoch": 0}}
    dcp.load(out, storage_reader=ShardReader(uri))
    assert not torch.equal(out["w"], torch.zeros(300, 7)) and out["n"]["epoch"] == 3


class _GatedWriter(ShardWriter):
    """A writer whose upload waits for ``gate``: its save stays in flight until then."""

    def __init__(self, uri: str, gate: threading.Event, **options: Any) -> None:
        super().__init__(uri, **options)
        self.gate = gate

    def write_data(self, plan: Any, planner: Any) -> Any:
        assert self.gate.wait(60), "the test never opened the gate"
        return super().write_data(plan, planner)


@pytest.mark.parametrize("backend", ["local", "moto-boto3"])
def test_pinned_stager_never_overwrites_an_upload_in_flight(
    backend: str, request: pytest.FixtureRequest, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """A second async_save through the same stager while the first still uploads: each
    checkpoint holds its own values (before: the first held the second's, CRCs and all)."""
    import logging

    target = make_target(backend, request, tmp_path)
    uris = [f"{target.uri}/{name}" for name in ("a", "b", "c")]
    stager, gate = PinnedStager(), threading.Event()
    state = {"w": torch.full((1 << 16,), 1.0), "n": {"step": 1}}
    first = dcp.async_save(
        state, storage_writer=_GatedWriter(uris[0], gate, **target.options), async_stager=stager
    )
    state["w"].fill_(2.0)
    state["n"]["step"] = 2
    with caplog.at_level(logging.INFO, logger="shardckpt.dcp.staging"):
        second = dcp.async_save(
            state, storage_writer=ShardWriter(uris[1], **target.options), async_stager=stager
        )
        second.result()
    assert not first.done(), "the first upload must still be in flight"
    gate.set()
    first.result()
    for uri, value in zip(uris, (1.0, 2.0), strict=False):
        out = {"w": torch.zeros(1 << 16), "n": {"step": 0}}
        dcp.load(out, storage_reader=ShardReader(uri, **target.options))
        assert torch.equal(out["w"], torch.full((1 << 16,), value)), uri
        assert out["n"]["step"] == value, uri
    assert "allocating another" in caplog.text
    # Both uploads are done: their sets are free again (DCP drops the staged dicts just
    # after the futures complete), so the next save reuses one instead of growing.
    deadline = time.monotonic() + 10
    while stager._busy and time.monotonic() < deadline:
        time.sleep(0.01)
    dcp.async_save(
        state, storage_writer=ShardWriter(uris[2], **target.options), async_stager=stager
    ).result()
    assert len(stager._sets) == 2
    stager.close()


def test_runs_without_a_process_group() -> None:
    assert not dist.is_initialized()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_overlap_mode_blocks_only_the_next_optimizer_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with Checkpointer(tmp_path / "run", overlap=True) as ck:
        with pytest.raises(RuntimeError, match="attach"):
            ck.save(0, {"model": model.state_dict()})
        ck.attach(opt)
        ck.save(1, {"model": model.state_dict()})
        model(torch.randn(8, 512)).sum().backward()  # overlaps with the copy
        opt.step()  # waits for the snapshot, then changes the weights
        ck.wait()
        out = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}}
        ck.load(out, step=1)
    for k, v in expected.items():
        assert torch.equal(out["model"][k], v), k
        assert not torch.equal(model.state_dict()[k], v), "the step did run"


def test_checkpointer_checkpoint_reads_with_plain_dcp(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Manifests name objects relative to their checkpoint, so a step written through the
    Checkpointer's root store loads from its own URI (or a copy elsewhere)."""
    with Checkpointer(tmp_path / "run") as ck:
        ck.save(3, {"w": torch.arange(10.0)}).wait()
    out = {"w": torch.zeros(10)}
    dcp.load(out, storage_reader=ShardReader(str(tmp_path / "run" / "step-0000000003")))
    assert torch.equal(out["w"], torch.arange(10.0))


def test_every_save_and_load_reports_its_figures(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    import logging

    from shardckpt.engine.checkpointer import LoadStats, SaveStats

    seen: list[Any] = []
    state = {"w": torch.randn(1 << 18), "v": torch.ones(10)}
    with caplog.at_level(logging.INFO, logger="shardckpt"):
        with Checkpointer(tmp_path / "run", on_stats=seen.append, object_size=1 << 20) as ck:
            ck.save(1, state).wait()
            ck.load({"w": torch.zeros(1 << 18), "v": torch.zeros(10)})
    save, load = seen
    assert isinstance(save, SaveStats) and isinstance(load, LoadStats)
    assert save.bytes == (1 << 20) + 40 and save.objects == 2 and save.requests >= 3
    assert 0 < save.blocked_s <= save.total_s and save.upload_gbps > 0 and save.retries == 0
    assert load.bytes == save.bytes and load.requests >= 2 and load.gbps > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shardckpt save ")]
    assert len(lines) == 1 and '"step": 1' in lines[0] and '"upload_gbps"' in lines[0]


def test_local_copy_serves_restarts_and_s3_stays_durable(
    request: pytest.FixtureRequest, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    target = make_target("moto-boto3", request, tmp_path)
    cache = tmp_path / "nvme"
    with Checkpointer(target.uri, local_copy=cache, **target.options) as ck:
        for step in (1, 2):
            ck.save(step, {"w": torch.full((1000,), float(step))})
    local = sorted(p.relative_to(cache).parts[0] for p in cache.rglob("rank*"))
    assert local == ["step-0000000002"], "only the newest checkpoint is kept locally"
    durable = open_store(target.uri, **target.options)
    data_keys = [o.key for o in durable.list("step-0000000002/") if "rank" in o.key]
    durable.delete(data_keys)  # S3 lost the data: the local copy still serves this node
    out = {"w": torch.zeros(1000)}
    with Checkpointer(target.uri, local_copy=cache, **target.options) as ck:
        assert ck.load(out) == 2 and torch.equal(out["w"], torch.full((1000,), 2.0))
        out1 = {"w": torch.zeros(1000)}
        ck.load(out1, step=1)  # not on local disk: read from S3
        assert torch.equal(out1["w"], torch.ones(1000))


def test_error_raised_by_the_handle_is_not_raised_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "run"
    ck = Checkpointer(root)
    (root / "step-0000000001").parent.mkdir(parents=True, exist_ok=True)
    (root / "step-0000000001").write_text("not a folder")
    handle = ck.save(1, {"w": torch.ones(3)})
    with pytest.raises(SaveFailedError):
        handle.wait()
    ck.wait()  # already delivered through the handle
    ck.save(2, {"w": torch.ones(3)}).wait()
    ck.close()
    assert Checkpointer(root).steps() == [2]


@pytest.mark.parametrize("backend", ["local", "moto-boto3"])
def test_a_failed_save_leaves_its_step_free(
    backend: str, request: pytest.FixtureRequest, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """After an outage fails save(5), save(5) again is a save, not CheckpointExistsError."""
    from shardckpt.store import RetryPolicy
    from tests.reliability.fault_proxy import FaultProxy, Rule, on

    target = make_target(backend, request, tmp_path)
    with contextlib.ExitStack() as stack:
        options = dict(target.options)
        if backend == "local":
            blocker = tmp_path / "store" / "step-0000000005"

            def outage(on_: bool) -> None:
                blocker.parent.mkdir(parents=True, exist_ok=True)
                if on_:
                    blocker.write_text("a file where the checkpoint's folder must go")
                else:
                    blocker.unlink()
        else:
            proxy = stack.enter_context(FaultProxy(str(options["endpoint"])))
            options["endpoint"] = proxy.endpoint
            options["retry"] = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02)

            def outage(on_: bool) -> None:
                proxy.set_rules([Rule("slowdown", match=on("PUT"))] if on_ else [])

        ck = stack.enter_context(Checkpointer(target.uri, **options))
        outage(True)
        with pytest.raises(SaveFailedError, match="step 5"):
            ck.save(5, {"w": torch.ones(3)}).wait()
        assert ck.steps() == []
        outage(False)
        ck.save(5, {"w": torch.full((3,), 5.0)}).wait()
        assert ck.steps() == [5]
        out = {"w": torch.zeros(3)}
        assert ck.load(out) == 5 and torch.equal(out["w"], torch.full((3,), 5.0))
        with pytest.raises(CheckpointExistsError, match="step-0000000005"):
            ck.save(5, {"w": torch.ones(3)})  # now it was saved


def test_sigterm_handler_chains_to_the_previous_one_and_close_restores_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    received: list[int] = []

    def previous(signum: int, frame: Any) -> None:
        received.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        ck = Checkpointer(tmp_path / "run")
        ck.install_sigterm_handler()
        assert signal.getsignal(signal.SIGTERM) is not previous
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)  # the handlers run in the main thread between bytecodes
        assert ck.preempted() and received == [signal.SIGTERM]
        ck.close()
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)


def test_sigterm_with_the_default_handler_before_only_notes_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIG_DFL before: SIGTERM is noted (the process lives on), and close restores SIG_DFL."""
    code = f"""
import os, signal, torch
from shardckpt import Checkpointer
signal.signal(signal.SIGTERM, signal.SIG_DFL)
ck = Checkpointer({str(tmp_path / "run")!r})
ck.install_sigterm_handler()
os.kill(os.getpid(), signal.SIGTERM)
assert ck.preempted()
ck.close()
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
print("alive")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "alive" in done.stdout, done.stderr


def _load_corrupt_on_two_ranks(rank: int, world_size: int, root: str) -> str:
    with Checkpointer(root) as ck:
        try:
            ck.load({"w": torch.zeros(1 << 16)})
        except ChecksumMismatchError as exc:  # ours, and catchable by except Exception
            return str(exc)
    return "loaded"


@pytest.mark.slow
def test_load_failing_on_every_rank_names_each_rank(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "run"
    with Checkpointer(root) as ck:
        ck.save(1, {"w": torch.arange(float(1 << 16))}).wait()
    (data,) = [p for p in root.rglob("rank*") if p.is_file()]
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    messages = run_ranks(_load_corrupt_on_two_ranks, 2, str(root))
    for message in messages:
        assert "rank 0: ChecksumMismatchError" in message, message
        assert "rank 1: ChecksumMismatchError" in message, message
