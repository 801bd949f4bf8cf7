"""The ``staging`` layer: snapshot a state dict into reused host buffers.

The snapshot is the only part of a save that blocks training. GPU tensors are copied into
pinned host buffers on a dedicated CUDA stream with non-blocking copies, then synchronized
with an event; CPU tensors are copied into plain host buffers. Buffers are allocated on the
first save and reused by every later save of the same shapes, so staging memory is bounded
by one copy of the state and never grows across saves.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from shardckpt.errors import SaveFailedError

logger = logging.getLogger(__name__)

Path = tuple[Any, ...]


class HostStaging:
    """A pool of host buffers and the copies into it.

    ``pin_memory``: pin buffers (default: when CUDA is available, since only then does pinning
    speed copies up).
    """

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[Path, torch.Tensor] = {}
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._lock = threading.Lock()
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-stage")

    @property
    def nbytes(self) -> int:
        """Host memory held by staging buffers, in bytes."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def snapshot(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``state_dict`` whose tensors live in host buffers; returns once every
        copy is complete, so training may then modify ``state_dict`` freely."""
        staged, wait = self.snapshot_async(state_dict, defer_cpu=False)
        wait()
        return staged

    def snapshot_async(
        self, state_dict: dict[str, Any], *, defer_cpu: bool = True
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Start the copies; return the staged state and a function that blocks until every
        copy is complete. GPU tensors are copied on a side CUDA stream; CPU tensors on a
        background thread (``defer_cpu``) or before returning. Until the wait function has
        returned, ``state_dict`` must not be modified (see the Checkpointer's overlap mode)."""
        with self._lock:
            seen: set[Path] = set()
            copies: list[tuple[torch.Tensor, torch.Tensor]] = []
            staged = self._stage_tree(state_dict, (), seen, copies)
            for path in set(self._buffers) - seen:  # state shrank: free what it no longer needs
                del self._buffers[path]
            device_copies = [(b, t) for b, t in copies if t.device.type != "cpu"]
            host_copies = [(b, t) for b, t in copies if t.device.type == "cpu"]
            event = self._copy_on_side_stream(device_copies) if device_copies else None
            if defer_cpu and host_copies:
                done = self._copier.submit(_copy_all, host_copies)
            else:
                _copy_all(host_copies)
                done = None
        logger.debug("staging %d tensors into %d bytes of host buffers", len(seen), self.nbytes)

        def wait() -> None:
            if done is not None:
                done.result()
            if event is not None:
                event.synchronize()

        return staged, wait

    def _copy_on_side_stream(self, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        stream = self._stream
        assert stream is not None, "GPU tensors without CUDA"
        # The side stream must see every kernel already queued on the compute stream.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for buffer, tensor in copies:
                buffer.copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)  # the allocator must not reuse it mid-copy
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def _stage_tree(
        self,
        value: Any,
        path: Path,
        seen: set[Path],
        copies: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> Any:
        if isinstance(value, DTensor):
            local = self._stage_tensor(value.to_local(), path, seen, copies)
            return DTensor(local, value._spec, requires_grad=False)
        if isinstance(value, torch.Tensor):
            return self._stage_tensor(value, path, seen, copies)
        if isinstance(value, dict):
            return {k: self._stage_tree(v, (*path, k), seen, copies) for k, v in value.items()}
        if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
            return type(value)(
                self._stage_tree(v, (*path, i), seen, copies) for i, v in enumerate(value)
            )
        try:
            return copy.deepcopy(value)  # non-tensor values may be mutated by training later
        except Exception as exc:
            where = ".".join(map(str, path)) or "the state dict"
            raise SaveFailedError(
                f"{where!r} cannot be copied for the snapshot: {type(exc).__name__}: {exc}"
            ) from exc

    def _stage_tensor(
        self,
        tensor: torch.Tensor,
        path: Path,
        seen: set[Path],
        copies: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        seen.add(path)
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = self.pin_memory and tensor.device.type == "cuda"
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buffer
        copies.append((buffer, tensor.detach()))
        return buffer

    def close(self) -> None:
        with self._lock:
            self._copier.shutdown(wait=True)
            self._buffers.clear()


class PinnedStager(AsyncStager):
    """DCP ``AsyncStager`` on top of :class:`HostStaging`, for
    ``dcp.async_save(sd, storage_writer=ShardWriter(...), async_stager=PinnedStager())``.

    Buffers are reused by the next ``stage``: wait for the previous ``async_save``'s future
    before starting the next one (the :class:`~shardckpt.Checkpointer` does this for you).
    """

    _synchronize_after_execute = False

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        self.staging = HostStaging(pin_memory=pin_memory)

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return self.staging.snapshot(state_dict)

    def synchronize_staging(self) -> None:
        """Nothing to do: :meth:`stage` returns after the copies are complete."""

    def close(self) -> None:
        self.staging.close()


def _copy_all(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for buffer, tensor in copies:
        buffer.copy_(tensor)
