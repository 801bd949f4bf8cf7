"""Loading into CUDA tensors through a small pool of reused pinned host memory.

A GET into pageable memory followed by ``copy_`` to the GPU copies synchronously through a
bounce buffer of the driver's: 4.2 GB/s on an H200 whose pinned host-to-device rate is
55 GB/s, and the whole state sat in host memory first. Here each data object's needed bytes
(one span) are fetched into one piece of a pool of a few object-sized pieces of pinned
memory, copied to the GPU with ``non_blocking`` on a side CUDA stream while the next
objects' GETs run, and checked against their CRC32C on the host while the copy reads the
same bytes (an item's checksum is combined over the objects it spans). A piece goes back
into use only once its copy's event has completed, so a GET never overwrites bytes a copy
still reads; when a load returns, failed or not, no copy reads a piece, and the caller's
stream is ordered after every copy. Pinned memory is bounded by the pool: ``threads + 1``
pieces of the largest span (at most an object, 64 MiB by default), kept by the reader
across its loads.

The pool and the order are plain Python over two small protocols (a copier and its events),
so all of the bookkeeping also runs on the CPU, with a copier that copies at once
(``tests/writer/test_device_load.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from shardckpt._util.bytes import byte_view_of, crc32c, crc32c_combine
from shardckpt.dcp.requests import COALESCE_GAP, Countdown
from shardckpt.dcp.staging import _ALIGN, PinnedSlab
from shardckpt.errors import SaveFailedError
from shardckpt.store.base import gather

logger = logging.getLogger(__name__)

D = TypeVar("D")
Pairs = list[tuple[torch.Tensor, torch.Tensor]]  # (device destination, host source)


class Event(Protocol):
    """What the pool needs of a copy's completion (``torch.cuda.Event`` has both)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class Copier(Protocol):
    """Host-to-device copies: ``copy`` queues one piece's copies and returns the event that
    completes after them; ``finish`` orders the caller after every copy and returns the
    seconds the copies ran; ``nbytes`` counts the bytes queued."""

    nbytes: int

    def copy(self, pairs: Pairs) -> Event: ...

    def finish(self) -> float: ...


class _Done:
    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class HostCopier:
    """The copier of a CPU "device": a plain copy, done when ``copy`` returns."""

    def __init__(self) -> None:
        self.nbytes, self._seconds = 0, 0.0
        self._lock = threading.Lock()

    def copy(self, pairs: Pairs) -> Event:
        start = time.perf_counter()
        for dst, src in pairs:
            dst.copy_(src)
        with self._lock:
            self.nbytes += sum(src.numel() for _, src in pairs)
            self._seconds += time.perf_counter() - start
        return _Done()

    def finish(self) -> float:
        return self._seconds


class CudaCopier:
    """Non-blocking copies on a side stream of ``device``, which first waits for what the
    caller's stream has queued (the targets may still be written there). Each piece's copies
    sit between two timing events, queued under a lock so no other piece's copies fall
    between them: their sum is the time the copy engine spent on this load."""

    def __init__(self, device: torch.device) -> None:
        self._caller = torch.cuda.current_stream(device)
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(self._caller)
        self.nbytes = 0
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._lock = threading.Lock()

    def copy(self, pairs: Pairs) -> Event:
        with self._lock, torch.cuda.stream(self.stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            end.record(self.stream)
            self._timed.append((start, end))
            self.nbytes += sum(src.numel() for _, src in pairs)
        return end

    def finish(self) -> float:
        self._caller.wait_stream(self.stream)
        self.stream.synchronize()  # cheap: the pool has drained; elapsed_time needs it
        return sum(start.elapsed_time(end) for start, end in self._timed) / 1e3


@dataclass
class Piece:
    """One piece of the pool's host memory, and the event of the last copy reading it."""

    index: int
    memory: torch.Tensor
    event: Event | None = None


class PiecePool:
    """``count`` pieces of ``piece_bytes`` of host memory (one slab, pinned if ``pin``),
    each handed to one user at a time. A released piece carries its copy's event; it is
    handed out again only after that event completed: a free piece whose copy is done is
    preferred, else the one released longest ago (its copy was queued first)."""

    def __init__(self, count: int, piece_bytes: int, *, pin: bool) -> None:
        if count < 1 or piece_bytes < 1:
            raise ValueError(f"a piece pool needs pieces and bytes, got {count} x {piece_bytes}")
        self.count, self.piece_bytes = count, piece_bytes
        stride = -(-piece_bytes // _ALIGN) * _ALIGN
        self._slab, memory = _host_memory(count * stride, pin)
        self._free = deque(
            Piece(i, memory[i * stride : i * stride + piece_bytes]) for i in range(count)
        )
        self._out: set[int] = set()
        self._ready = threading.Condition()

    @property
    def pinned_bytes(self) -> int:
        """Page-locked host memory held, in bytes (0 if pinning was refused or not asked)."""
        return self._slab.nbytes if self._slab is not None else 0

    def acquire(self, nbytes: int) -> Piece:
        """A piece for ``nbytes``, once one is free and no copy reads it; blocks meanwhile."""
        if nbytes > self.piece_bytes:
            raise ValueError(f"{nbytes} bytes do not fit a piece of {self.piece_bytes} bytes")
        with self._ready:
            self._ready.wait_for(lambda: bool(self._free))
            piece = next((p for p in self._free if p.event is None or p.event.query()), None)
            piece = piece or self._free[0]
            self._free.remove(piece)
            self._out.add(piece.index)
        if piece.event is not None:
            piece.event.synchronize()
            piece.event = None
        return piece

    def release(self, piece: Piece, event: Event | None) -> None:
        """Give ``piece`` back; ``event``: the completion of the copy still reading it."""
        with self._ready:
            if piece.index not in self._out:
                raise ValueError(f"piece {piece.index} was not handed out")
            self._out.remove(piece.index)
            piece.event = event
            self._free.append(piece)
            self._ready.notify()

    def drain(self) -> None:
        """Wait until no copy reads any free piece."""
        with self._ready:
            pending = [p for p in self._free if p.event is not None]
        for piece in pending:
            assert piece.event is not None
            piece.event.synchronize()
            piece.event = None


def _host_memory(nbytes: int, pin: bool) -> tuple[PinnedSlab | None, torch.Tensor]:
    """``nbytes`` of host memory, page-locked when ``pin`` and the system allows it; the
    load still works from pageable memory (at the pageable rate) when it does not."""
    if pin:
        try:
            slab = PinnedSlab(nbytes)
            return slab, slab.memory
        except SaveFailedError as exc:
            logger.warning("loading through pageable host memory: %s", exc)
    return None, torch.empty(nbytes, dtype=torch.uint8)


@dataclass
class Fill(Generic[D]):
    """One item to load: ``device`` (flat bytes) receives its stored bytes, which are
    ``pieces``: (object key, start in the object, length, offset in the item), in order."""

    dest: D
    device: torch.Tensor
    pieces: Sequence[tuple[str, int, int, int]]


@dataclass
class Span(Generic[D]):
    """One GET: bytes ``[start, end)`` of ``key``, holding ``segments`` (fill, start in the
    object, length, offset in the item); the gaps between them are read and dropped."""

    key: str
    start: int
    end: int
    segments: list[tuple[Fill[D], int, int, int]]


def spans(fills: Sequence[Fill[D]]) -> list[Span[D]]:
    """The GETs for ``fills``: per object, neighbouring ranges closer than ``COALESCE_GAP``
    share one (as the reader's ``coalesce``, which needs the destination views up front:
    here a piece is chosen only when its GET starts). A span never leaves its object, so
    the largest span is at most an object."""
    per_object: dict[str, list[tuple[Fill[D], int, int, int]]] = defaultdict(list)
    for fill in fills:
        for key, start, length, at in fill.pieces:
            per_object[key].append((fill, start, length, at))
    out: list[Span[D]] = []
    for key, segments in per_object.items():
        segments.sort(key=lambda s: s[1])
        first = len(out)
        for segment in segments:
            _, start, length, _ = segment
            if len(out) > first and start - out[-1].end <= COALESCE_GAP:
                out[-1].segments.append(segment)
                out[-1].end = max(out[-1].end, start + length)
            else:
                out.append(Span(key, start, start + length, [segment]))
    return out


@dataclass(frozen=True)
class DeviceLoadStats:
    """The pinned path's share of one load: ``nbytes`` copied to ``device`` in ``copy_s``
    seconds of copying (so ``h2d_gbps`` is the copies' own rate), through ``pieces`` pieces
    holding ``pinned_bytes`` of page-locked memory (0: pageable)."""

    device: str
    nbytes: int
    copy_s: float
    pieces: int
    pinned_bytes: int

    @property
    def h2d_gbps(self) -> float:
        return self.nbytes / 1e9 / self.copy_s if self.copy_s else 0.0


class DeviceLoader:
    """The pinned path of one reader: ``threads`` parallel GETs, and its piece pool, kept
    across its loads (replaced when a load needs larger or more pieces)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: PiecePool | None = None

    def load(
        self,
        fills: Sequence[Fill[D]],
        get: Callable[[str, int, list[memoryview]], None],
        check: Callable[[D, int], None],
    ) -> DeviceLoadStats:
        """GET every fill's bytes into pieces, copy them to the fills' device (one device: a
        stream belongs to one), and ``check`` each item with the CRC32C of its host bytes."""
        device = fills[0].device.device
        todo = spans(fills)
        landed = Countdown([fill for span in todo for fill, *_ in span.segments])
        for fill in fills:
            if not landed.waits_for(fill):
                check(fill.dest, 0)
        pool = self._pool_for(todo, pin=device.type == "cuda")
        copier: Copier = CudaCopier(device) if device.type == "cuda" else HostCopier()
        crcs: dict[tuple[int, int], int] = {}

        def fetch(span: Span[D]) -> None:
            size = span.end - span.start
            piece, event = pool.acquire(size), None
            try:
                host = piece.memory[:size]
                get(span.key, span.start, [byte_view_of(host)])
                parts = [(f, at, host[s - span.start :][:n]) for f, s, n, at in span.segments]
                event = copier.copy([(f.device[at:][: len(part)], part) for f, at, part in parts])
                for fill, at, part in parts:
                    crcs[id(fill), at] = crc32c(byte_view_of(part))  # while the copy runs
            finally:
                pool.release(piece, event)
            for fill in landed.done([fill for fill, *_ in span.segments]):
                check(fill.dest, _combined(crcs, fill))

        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="shardckpt-h2d") as workers:
                gather([workers.submit(fetch, span) for span in todo])
        finally:
            pool.drain()  # a failed load too: no copy may read a piece once we return
            seconds = copier.finish()
        return DeviceLoadStats(str(device), copier.nbytes, seconds, pool.count, pool.pinned_bytes)

    def _pool_for(self, todo: list[Span[D]], *, pin: bool) -> PiecePool:
        need = max((s.end - s.start for s in todo), default=1)
        count = max(1, min(len(todo), self.threads + 1))
        pool = self._pool
        if pool is None or pool.piece_bytes < need or pool.count < count:
            pool = self._pool = None  # the old slab is unpinned before the new one is pinned
            pool = self._pool = PiecePool(count, need, pin=pin)
            logger.debug("pinned load: %d pieces of %d bytes", count, need)
        return pool


def _combined(crcs: dict[tuple[int, int], int], fill: Fill[D]) -> int:
    """The CRC32C of ``fill``'s item from those of its pieces, in item order."""
    value = 0
    for _, _, length, at in fill.pieces:
        value = crc32c_combine(value, crcs[id(fill), at], length)
    return value


def device_bytes(target: torch.Tensor, direct: bool, length: int) -> torch.Tensor:
    """Where an item's ``length`` stored bytes land on ``target``'s device: ``target``'s own
    memory when ``direct``, else a buffer of their own (the reader narrows from it)."""
    if direct:
        return target.reshape(-1).view(torch.uint8)
    return torch.empty(length, dtype=torch.uint8, device=target.device)


def load_device() -> torch.device | None:
    """The device whose tensors load through pinned pieces: the current CUDA device (a side
    stream belongs to one device), or None without CUDA."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
