"""Raw bytes of tensors and checksums over buffers, without copies where the memory allows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future

import crc32c as _crc32c
import numpy as np
import torch
import xxhash


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` as a flat byte view: no copy for a contiguous CPU tensor;
    a copy to CPU / contiguous memory otherwise. The view keeps the memory alive."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def byte_view_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (for reading into it)."""
    if tensor.numel() == 0:
        return memoryview(bytearray(0))
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def crc32c(views: Sequence[memoryview] | memoryview, value: int = 0) -> int:
    """CRC32C of the concatenation of ``views`` (releases the GIL on large buffers)."""
    if isinstance(views, memoryview):
        views = [views]
    for v in views:
        if len(v):
            value = _crc32c.crc32c(v, value)
    return value


def batches(
    views: Sequence[memoryview], batch_bytes: int = 8 << 20, max_items: int = 4096
) -> list[range]:
    """Consecutive index ranges of ``views`` holding about ``batch_bytes`` each, so work per
    view (a checksum) can go to a thread pool without one task per tiny tensor."""
    out: list[range] = []
    start, size = 0, 0
    for i, v in enumerate(views):
        if i > start and (size >= batch_bytes or i - start >= max_items):
            out.append(range(start, i))
            start, size = i, 0
        size += len(v)
    if start < len(views):
        out.append(range(start, len(views)))
    return out


def crc32c_of(views: Sequence[memoryview]) -> list[int]:
    """The CRC32C of each view."""
    return [crc32c(v) for v in views]


def empty_bytes(n: int) -> memoryview:
    """An uninitialized writable byte buffer (numpy: no zero-fill, unlike bytearray)."""
    return memoryview(np.empty(n, dtype=np.uint8))


def xxh3_of(views: Sequence[memoryview]) -> list[int]:
    """The 64-bit XXH3 of each view."""
    return [xxhash.xxh3_64_intdigest(v) for v in views]


def per_view(
    pool: Executor, fn: Callable[[Sequence[memoryview]], list[int]], views: Sequence[memoryview]
) -> list[Future[list[int]]]:
    """``fn`` (``crc32c_of``, ``xxh3_of``) over ``views`` in batches on ``pool``; the
    concatenated results of the futures are one value per view."""
    return [pool.submit(fn, views[r.start : r.stop]) for r in batches(views)]


def each_view(
    pool: Executor, fn: Callable[[Sequence[memoryview]], list[int]], views: Sequence[memoryview]
) -> list[int]:
    """:func:`per_view`, waited for: one value per view."""
    return [value for future in per_view(pool, fn, views) for value in future.result()]


# CRC32C of a concatenation from the CRC32Cs of its parts (zlib's crc32_combine, with
# CRC32C's reflected polynomial): arithmetic on polynomials mod P over GF(2).
_POLY = 0x82F63B78


def _multmodp(a: int, b: int) -> int:
    """a * b mod P (bit-reflected)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod P, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32c_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC32C of A + B from CRC32C(A), CRC32C(B) and len(B)."""
    p, k, n = 1 << 31, 3, length2  # x^(8 * length2) mod P
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2
