"""The pinned-memory / CUDA-stream snapshot path. Runs where CUDA exists; skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from shardckpt import Checkpointer, PinnedStager, ShardReader, ShardWriter
from shardckpt.dcp.staging import HostStaging

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def odd_state() -> dict[str, torch.Tensor]:
    """Sizes that are not powers of two, mixed dtypes, a scalar and an empty tensor."""
    g = torch.Generator(device="cuda").manual_seed(0)
    return {
        "w": torch.randn(3 * 1024 + 1, 1000, device="cuda", generator=g),
        "h": torch.randn(777, 333, device="cuda", generator=g).to(torch.bfloat16),
        "i": torch.randint(0, 1 << 40, (12345,), device="cuda", generator=g),
        "mask": torch.rand(5, 7, device="cuda", generator=g) > 0.5,
        "scale": torch.tensor(0.125, device="cuda"),
        "empty": torch.empty(0, 4, device="cuda"),
    }


def test_snapshot_to_one_exact_pinned_slab_reused() -> None:
    staging = HostStaging()
    state = odd_state()
    first = staging.snapshot(state)
    logical = sum(t.numel() * t.element_size() for t in state.values())
    # one slab of the exact size (page-aligned pieces), not power-of-two pinned blocks
    assert logical <= staging.nbytes <= logical + 4096 * len(state)
    for key, tensor in state.items():
        assert first[key].device.type == "cpu" and first[key].dtype == tensor.dtype
        assert torch.equal(first[key], tensor.cpu()), key
        if tensor.numel():
            assert first[key].is_pinned(), key
    pointers = {k: first[k].data_ptr() for k in state}
    state["w"].mul_(2)
    second = staging.snapshot(state)
    assert {k: second[k].data_ptr() for k in state} == pointers, "pinned buffers must be reused"
    assert torch.equal(second["w"], state["w"].cpu())
    staging.close()


def test_layout_change_repins() -> None:
    staging = HostStaging()
    a = torch.randn(1000, device="cuda")
    staging.snapshot({"a": a})
    small = staging.nbytes
    both = staging.snapshot({"a": a, "b": torch.ones(1 << 20, device="cuda")})
    assert torch.equal(both["a"], a.cpu()) and torch.equal(both["b"], torch.ones(1 << 20))
    assert staging.nbytes > small
    staging.snapshot({"a": a})
    assert staging.nbytes == small, "a shrunk state frees the larger slab"


def test_snapshot_sees_queued_kernels_and_not_later_ones() -> None:
    staging = HostStaging()
    w = torch.zeros(1 << 22, device="cuda")
    w.add_(1)  # queued on the compute stream before the snapshot
    staged, wait = staging.snapshot_async({"w": w})
    wait()
    w.add_(1)  # after the snapshot completed
    torch.cuda.synchronize()
    assert torch.equal(staged["w"], torch.ones(1 << 22))


def test_checkpointer_round_trips_gpu_state_into_gpu_tensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = odd_state()
    saved = []
    with Checkpointer(tmp_path / "run", keep_last=2) as ck:
        for step in range(5):
            state["w"].add_(1)
            ck.save(step, state)
            saved.append({k: v.cpu().clone() for k, v in state.items()})
            nbytes = ck.staging.nbytes
        ck.wait()
        assert ck.steps() == [3, 4]
        assert ck.staging.nbytes == nbytes
        for step in (3, 4):
            out = {k: torch.zeros_like(v) for k, v in state.items()}
            ck.load(out, step=step)
            for k, v in out.items():
                assert v.device.type == "cuda" and torch.equal(v.cpu(), saved[step][k]), (step, k)


def test_dcp_async_save_with_pinned_stager_on_gpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = odd_state()
    expected = {k: v.cpu().clone() for k, v in state.items()}
    stager = PinnedStager()
    uri = str(tmp_path / "dcp")
    future = dcp.async_save(state, storage_writer=ShardWriter(uri), async_stager=stager)
    state["w"].zero_()  # staged already: must not reach the checkpoint
    future.result()
    stager.close()
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=ShardReader(uri))
    for k, v in out.items():
        assert torch.equal(v.cpu(), expected[k]), k


def test_overlap_with_optimizer_on_gpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(1024, 1024).cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 1024, device="cuda")).sum().backward()
    opt.step()
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with Checkpointer(tmp_path / "run", overlap=True) as ck:
        ck.attach(opt)
        ck.save(1, {"model": model.state_dict()})
        model(torch.randn(4, 1024, device="cuda")).sum().backward()
        opt.step()
        ck.wait()
        out = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
        ck.load(out, step=1)
    for k, v in expected.items():
        assert torch.equal(out["model"][k].cpu(), v), k
