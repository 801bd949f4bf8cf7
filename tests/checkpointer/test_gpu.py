"""The pinned-memory / CUDA-stream snapshot path. Runs where CUDA exists; skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from shardckpt import Checkpointer
from shardckpt.staging import HostStaging

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_snapshot_to_pinned_buffers_is_exact_and_reused() -> None:
    staging = HostStaging()
    state = {"w": torch.randn(1024, 1024, device="cuda"), "b": torch.arange(10, device="cuda")}
    first = staging.snapshot(state)
    assert first["w"].is_pinned() and first["w"].device.type == "cpu"
    assert torch.equal(first["w"], state["w"].cpu()) and torch.equal(first["b"], state["b"].cpu())
    ptr = first["w"].data_ptr()
    state["w"].mul_(2)
    second = staging.snapshot(state)
    assert second["w"].data_ptr() == ptr, "pinned buffers must be reused"
    assert torch.equal(second["w"], state["w"].cpu())


def test_snapshot_sees_queued_kernels_and_not_later_ones() -> None:
    staging = HostStaging()
    w = torch.zeros(1 << 22, device="cuda")
    w.add_(1)  # queued on the compute stream before the snapshot
    staged, wait = staging.snapshot_async({"w": w})
    wait()
    w.add_(1)  # after the snapshot completed
    torch.cuda.synchronize()
    assert torch.equal(staged["w"], torch.ones(1 << 22))


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
