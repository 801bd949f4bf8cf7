"""The ``staging`` layer: snapshot a state dict into reused host buffers.

The snapshot is the only part of a save that blocks training. GPU tensors are copied into
pinned host memory on a dedicated CUDA stream with non-blocking copies, then synchronized
with an event; CPU tensors are copied into plain host buffers. Buffers are allocated on the
first save and reused by every later save of the same shapes, so staging memory is bounded
by one copy of the state and never grows across saves.

Pinned memory is one slab per layout, page-locked at its exact size with ``cudaHostRegister``:
torch's pinned allocator rounds every allocation up to a power of two, which would hold up
to twice the state's bytes in locked RAM.
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager

from shardckpt._util.tree import Path, map_leaves, tensor_leaves
from shardckpt.compat import pin_host_memory, unpin_host_memory
from shardckpt.errors import SaveFailedError

logger = logging.getLogger(__name__)

Spec = tuple[tuple[int, ...], torch.dtype]
_ALIGN = 4096  # slab offsets: page-aligned, so every dtype view is aligned too


class PinnedSlab:
    """``nbytes`` of host memory page-locked with ``cudaHostRegister``, cut into views.

    The registration is undone when the slab is garbage-collected; views handed out before
    keep the memory itself alive (then merely unpinned), so nothing reads freed memory.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.memory = torch.empty(nbytes, dtype=torch.uint8)
        pointer = self.memory.data_ptr()
        error = pin_host_memory(pointer, nbytes)
        if error:
            raise SaveFailedError(
                f"cannot pin {nbytes} bytes of host memory for staging (CUDA error {error}); "
                "is the locked-memory limit (ulimit -l) too low?"
            )
        weakref.finalize(self, unpin_host_memory, pointer)

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = _nbytes(shape, dtype)
        return self.memory[offset : offset + nbytes].view(dtype).view(shape)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


class HostStaging:
    """A pool of host buffers and the copies into it.

    ``pin_memory``: pin the buffers of GPU tensors (default: when CUDA is available).
    """

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[Path, torch.Tensor] = {}
        self._slab: PinnedSlab | None = None
        self._slab_layout: dict[Path, Spec] = {}
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._lock = threading.Lock()
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-stage")

    @property
    def nbytes(self) -> int:
        """Host memory held by staging buffers, in bytes (the pinned slab counted whole)."""
        plain = sum(
            b.numel() * b.element_size()
            for p, b in self._buffers.items()
            if p not in self._slab_layout
        )
        return plain + (self._slab.nbytes if self._slab is not None else 0)

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
            tensors = {path: t.detach() for path, t in tensor_leaves(state_dict).items()}
            self._allocate(tensors)
            staged = map_leaves(state_dict, lambda path, _: self._buffers[path], _deepcopy)
            copies = [(self._buffers[path], t) for path, t in tensors.items()]
            device_copies = [(b, t) for b, t in copies if t.device.type != "cpu"]
            host_copies = [(b, t) for b, t in copies if t.device.type == "cpu"]
            event = self._copy_on_side_stream(device_copies) if device_copies else None
            if defer_cpu and host_copies:
                done = self._copier.submit(_copy_all, host_copies)
            else:
                _copy_all(host_copies)
                done = None
        logger.debug("staging %d tensors into %d bytes of host buffers", len(tensors), self.nbytes)

        def wait() -> None:
            if done is not None:
                done.result()
            if event is not None:
                event.synchronize()

        return staged, wait

    def _allocate(self, tensors: dict[Path, torch.Tensor]) -> None:
        """Make ``self._buffers`` hold a buffer of the right shape and dtype for every path,
        reusing what the last snapshot had; the pinned slab is rebuilt when any GPU tensor's
        shape or dtype changed."""
        specs = {path: (tuple(t.shape), t.dtype) for path, t in tensors.items()}
        pinned = {
            path: spec
            for path, spec in specs.items()
            if self.pin_memory and tensors[path].device.type == "cuda"
        }
        if pinned != self._slab_layout:
            self._buffers = {p: b for p, b in self._buffers.items() if p not in self._slab_layout}
            self._slab, self._slab_layout = None, {}  # unpinned before the new slab is pinned
            if pinned:
                self._buffers.update(self._pin(pinned))
        for path in set(self._buffers) - specs.keys():  # state shrank: free what it no longer needs
            del self._buffers[path]
        for path, (shape, dtype) in specs.items():
            buffer = self._buffers.get(path)
            if buffer is None or (tuple(buffer.shape), buffer.dtype) != (shape, dtype):
                self._buffers[path] = torch.empty(shape, dtype=dtype, device="cpu")

    def _pin(self, layout: dict[Path, Spec]) -> dict[Path, torch.Tensor]:
        offsets, end = {}, 0
        for path, spec in layout.items():
            offsets[path] = end
            end += -(-_nbytes(*spec) // _ALIGN) * _ALIGN
        self._slab, self._slab_layout = PinnedSlab(max(end, 1)), layout
        logger.info("staging: pinned %d bytes of host memory for %d tensors", end, len(layout))
        return {path: self._slab.view(offsets[path], *spec) for path, spec in layout.items()}

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

    def close(self) -> None:
        with self._lock:
            self._copier.shutdown(wait=True)
            self._buffers.clear()
            self._slab, self._slab_layout = None, {}


def _deepcopy(path: Path, value: Any) -> Any:
    try:
        return copy.deepcopy(value)  # non-tensor values may be mutated by training later
    except Exception as exc:
        where = ".".join(map(str, path)) or "the state dict"
        raise SaveFailedError(
            f"{where!r} cannot be copied for the snapshot: {type(exc).__name__}: {exc}"
        ) from exc


class _Staged(dict):  # type: ignore[type-arg]
    """A staged state dict: a dict that can be watched (``weakref.finalize``) until DCP
    drops it, which is when its upload no longer reads the buffers behind it."""


class PinnedStager(AsyncStager):
    """DCP ``AsyncStager`` on top of :class:`HostStaging`, for
    ``dcp.async_save(sd, storage_writer=ShardWriter(...), async_stager=PinnedStager())``.

    Keeps a pool of buffer sets. A set is busy from ``stage`` until DCP drops the staged dict
    (its upload has finished); a ``stage`` while every set is busy (an ``async_save`` started
    before the previous one finished) gets a new set rather than overwriting bytes an upload
    still reads, and says so at INFO. It never waits for a set: a failed upload's traceback
    may keep its staged dict alive for as long as the caller keeps the error.
    """

    _synchronize_after_execute = False

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        self._pin_memory = pin_memory
        self._lock = threading.Lock()
        self._sets: list[HostStaging] = [HostStaging(pin_memory=pin_memory)]
        self._busy: set[int] = set()

    @property
    def staging(self) -> HostStaging:
        """The first buffer set (the only one unless saves overlapped)."""
        return self._sets[0]

    @property
    def nbytes(self) -> int:
        """Host memory held by all buffer sets, in bytes."""
        return sum(s.nbytes for s in self._sets)

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            index = next((i for i in range(len(self._sets)) if i not in self._busy), None)
            if index is None:
                index = len(self._sets)
                self._sets.append(HostStaging(pin_memory=self._pin_memory))
                logger.info(
                    "staging: all %d buffer sets are still read by uploads in flight; "
                    "allocating another (wait for the previous async_save to reuse one)",
                    index,
                )
            self._busy.add(index)
        try:
            staged = _Staged(self._sets[index].snapshot(state_dict))
        except BaseException:
            self._release(index)
            raise
        weakref.finalize(staged, self._release, index)
        return staged

    def _release(self, index: int) -> None:
        with self._lock:
            self._busy.discard(index)

    def synchronize_staging(self) -> None:
        """Nothing to do: :meth:`stage` returns after the copies are complete."""

    def close(self) -> None:
        for staging in self._sets:
            staging.close()


def _copy_all(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for buffer, tensor in copies:
        buffer.copy_(tensor)
