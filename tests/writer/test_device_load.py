"""The pinned path for CUDA targets (shardckpt/dcp/device_load.py).

On the CPU: the piece pool's bookkeeping (reuse only after a copy's event completed, the
order, the bound, misuse), the GETs it plans, and whole loads through ``DeviceLoader`` from
real stores into CPU "device" tensors, with the copier that copies at once. Where CUDA
exists: ``dcp.load`` into CUDA tensors through the reader, bit-exact, through pinned pieces.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt import ChecksumMismatchError, ShardReader, ShardWriter
from shardckpt._util.bytes import crc32c
from shardckpt.dcp.device_load import DeviceLoader, Fill, PiecePool, spans
from shardckpt.dcp.requests import COALESCE_GAP
from shardckpt.errors import ObjectNotFoundError
from tests.conftest import make_target

MiB = 1 << 20


class Copy:
    """A copy's completion that the test decides; records whether the pool waited for it."""

    def __init__(self, done: bool = False) -> None:
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited, self.done = True, True


# -- the pool ----------------------------------------------------------------------------------
def test_a_piece_whose_copy_is_done_is_preferred_and_a_busy_one_waited_for() -> None:
    pool = PiecePool(2, 100, pin=False)
    a, b = pool.acquire(100), pool.acquire(10)
    busy, done = Copy(), Copy(done=True)
    pool.release(a, busy)
    pool.release(b, done)
    assert pool.acquire(100) is b and not busy.waited, "took the piece a copy still reads"
    assert pool.acquire(1) is a and busy.waited, "reused a piece before its copy completed"


def test_without_a_finished_copy_the_piece_released_first_is_waited_for() -> None:
    pool = PiecePool(3, 8, pin=False)
    pieces = [pool.acquire(8) for _ in range(3)]
    copies = [Copy(), Copy(), Copy()]
    for piece, copy in zip([pieces[1], pieces[0], pieces[2]], copies, strict=True):
        pool.release(piece, copy)
    assert pool.acquire(8) is pieces[1]
    assert [c.waited for c in copies] == [True, False, False]


def test_pieces_are_disjoint_and_acquire_waits_at_the_bound() -> None:
    pool = PiecePool(2, 5000, pin=False)
    a, b = pool.acquire(5000), pool.acquire(5000)
    a.memory.fill_(1)
    b.memory.fill_(2)
    assert a.memory.eq(1).all() and b.memory.eq(2).all()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(1)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got, "handed out more pieces than the pool holds"
    pool.release(b, None)
    waiter.join(5)
    assert got == [b]


def test_misuse_is_refused_and_drain_waits_for_every_copy() -> None:
    with pytest.raises(ValueError, match="needs pieces and bytes, got 0 x 10"):
        PiecePool(0, 10, pin=False)
    pool = PiecePool(2, 10, pin=False)
    with pytest.raises(ValueError, match="11 bytes do not fit a piece of 10 bytes"):
        pool.acquire(11)
    a, b = pool.acquire(10), pool.acquire(10)
    pool.release(a, copy_a := Copy())
    with pytest.raises(ValueError, match="was not handed out"):
        pool.release(a, None)
    pool.release(b, copy_b := Copy())
    pool.drain()
    assert copy_a.waited and copy_b.waited
    assert pool.pinned_bytes == 0


# -- the GETs ------------------------------------------------------------------------------------
def test_spans_coalesce_neighbours_of_one_object_only() -> None:
    device = torch.empty(0, dtype=torch.uint8)
    near = Fill("near", device, [("o1", 0, 100, 0), ("o2", 0, 50, 100)])
    next_to = Fill("next", device, [("o1", 100 + COALESCE_GAP, 10, 0)])
    far = Fill("far", device, [("o1", 200 + 2 * COALESCE_GAP, 10, 0)])
    same = Fill("same", device, [("o1", 0, 100, 0)])  # the very same bytes: one GET
    got = {
        (s.key, s.start, s.end): [f.dest for f, *_ in s.segments]
        for s in spans([near, next_to, far, same])
    }
    assert got == {
        ("o1", 0, 110 + COALESCE_GAP): ["near", "same", "next"],
        ("o1", 200 + 2 * COALESCE_GAP, 210 + 2 * COALESCE_GAP): ["far"],
        ("o2", 0, 50): ["near"],
    }


# -- whole loads on the CPU, from real stores ---------------------------------------------------------
def _objects(store, sizes: list[int]) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    data = {}
    for i, size in enumerate(sizes):
        data[f"obj/{i}"] = (
            torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g).numpy().tobytes()
        )
        store.put(f"obj/{i}", [data[f"obj/{i}"]])
    return data


def _items(data: dict[str, bytes]) -> dict[str, list[tuple[str, int, int, int]]]:
    """Items of the objects above: one spanning three objects, small neighbours, one behind a
    gap larger than COALESCE_GAP, an empty one, two with the very same bytes."""
    return {
        "spans": [("obj/0", MiB, MiB, 0), ("obj/1", 0, 2 * MiB, MiB), ("obj/2", 0, 100, 3 * MiB)],
        "a": [("obj/0", 0, 1000, 0)],
        "b": [("obj/0", 1000, 24, 0)],
        "same_as_b": [("obj/0", 1000, 24, 0)],
        "far": [("obj/2", 100 + COALESCE_GAP + 1, 5000, 0)],
        "empty": [],
    }


def _expected(data: dict[str, bytes], pieces: list[tuple[str, int, int, int]]) -> bytes:
    return b"".join(data[k][s : s + n] for k, s, n, _ in pieces)


@pytest.mark.parametrize("name", ["local", "moto-boto3"])
def test_a_load_through_few_reused_pieces_is_exact_and_checked(  # type: ignore[no-untyped-def]
    name: str, request: pytest.FixtureRequest, tmp_path
) -> None:
    target = make_target(name, request, tmp_path)
    store = target.open()
    data = _objects(store, [2 * MiB, 2 * MiB, 2 * MiB])
    items = _items(data)
    fills = [
        Fill(n, torch.full((sum(p[2] for p in ps),), 7, dtype=torch.uint8), ps)
        for n, ps in items.items()
    ]
    checked: dict[str, int] = {}

    def check(name: str, crc: int) -> None:
        assert name not in checked, f"{name} checked twice"
        checked[name] = crc

    loader = DeviceLoader(threads=2)
    stats = loader.load(fills, store.get_into, check)
    for fill in fills:
        expected = _expected(data, items[fill.dest])
        assert fill.device.numpy().tobytes() == expected, fill.dest
        assert checked[fill.dest] == crc32c(memoryview(expected)), fill.dest
    assert len(spans(fills)) == 4 and stats.pieces == 3, "one piece per thread and a spare"
    assert stats.nbytes == sum(len(_expected(data, p)) for p in items.values())
    assert stats.pinned_bytes == 0 and stats.device == "cpu"
    pool = loader._pool
    stats = loader.load(fills, store.get_into, lambda *_: None)
    assert loader._pool is pool, "a second load of the same sizes pins nothing new"


@pytest.mark.parametrize("name", ["local", "moto-boto3"])
def test_a_failed_load_leaves_every_piece_free(  # type: ignore[no-untyped-def]
    name: str, request: pytest.FixtureRequest, tmp_path
) -> None:
    target = make_target(name, request, tmp_path)
    store = target.open()
    data = _objects(store, [MiB, MiB])
    fills = [Fill(k, torch.empty(MiB, dtype=torch.uint8), [(k, 0, MiB, 0)]) for k in data]

    def check(key: str, crc: int) -> None:
        if crc != crc32c(memoryview(data[key])):
            raise ChecksumMismatchError(f"{key} is corrupt")

    loader = DeviceLoader(threads=1)
    loader.load(fills, store.get_into, check)
    store.put("obj/1", [data["obj/1"][:-1] + bytes([data["obj/1"][-1] ^ 1])])
    with pytest.raises(ChecksumMismatchError, match="obj/1 is corrupt"):
        loader.load(fills, store.get_into, check)
    missing = [Fill("gone", torch.empty(10, dtype=torch.uint8), [("obj/gone", 0, 10, 0)])]
    with pytest.raises(ObjectNotFoundError):
        loader.load(missing, store.get_into, check)
    pool = loader._pool
    assert pool is not None
    assert [pool.acquire(1) for _ in range(pool.count)], "a failed load kept a piece"


def test_a_cpu_load_takes_the_host_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = {"w": torch.arange(1000.0), "v": torch.arange(10)}
    dcp.save(state, storage_writer=ShardWriter(str(tmp_path / "c")))
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    reader = ShardReader(str(tmp_path / "c"))
    dcp.load(out, storage_reader=reader)
    assert all(torch.equal(out[k], v) for k, v in state.items())
    assert reader.device_stats is None and reader._device_loader._pool is None


# -- CUDA: the reader's pinned path ----------------------------------------------------------------
def _cuda_state() -> dict[str, torch.Tensor]:
    """Items spanning objects (1 MiB objects), mixed dtypes, odd sizes, an empty tensor,
    a non-contiguous target (loaded through a device buffer and narrowed)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    return {
        "big": torch.randn(3 * MiB // 4 + 7, device="cuda", generator=g),
        "h": torch.randn(777, 333, device="cuda", generator=g).to(torch.bfloat16),
        "i": torch.randint(0, 1 << 40, (12345,), device="cuda", generator=g),
        "mask": torch.rand(5, 7, device="cuda", generator=g) > 0.5,
        "empty": torch.empty(0, 4, device="cuda"),
        "t": torch.randn(300, 200, device="cuda", generator=g),
    }


@pytest.mark.parametrize("name", ["local", "moto-boto3"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_targets_load_bit_exact_through_pinned_pieces(  # type: ignore[no-untyped-def]
    name: str, request: pytest.FixtureRequest, tmp_path
) -> None:
    target = make_target(name, request, tmp_path)
    uri = f"{target.uri}/gpu"
    state = _cuda_state()
    dcp.save(state, storage_writer=ShardWriter(uri, object_size=MiB, **target.options))
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    out["t"] = torch.zeros(200, 300, device="cuda").t()  # not contiguous: not filled in place
    reader = ShardReader(uri, num_threads=2, **target.options)  # 3 pieces for 4 objects
    dcp.load(out, storage_reader=reader)
    for k, v in state.items():  # on the caller's stream, with no synchronize of ours
        assert out[k].device.type == "cuda" and torch.equal(out[k], v), k
    stats = reader.device_stats
    assert stats is not None and stats.pinned_bytes > 0, "not loaded through pinned memory"
    assert stats.nbytes == sum(v.numel() * v.element_size() for v in state.values())
    assert stats.pinned_bytes < stats.nbytes, "pinned memory must be a few pieces, not the state"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_corrupt_object_fails_a_cuda_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = _cuda_state()
    uri = str(tmp_path / "bad")
    dcp.save(state, storage_writer=ShardWriter(uri, object_size=MiB))
    (victim,) = [
        p for p in (tmp_path / "bad").rglob("*") if p.is_file() and p.stat().st_size == MiB
    ][:1]
    raw = bytearray(victim.read_bytes())
    raw[12345] ^= 0xFF
    victim.write_bytes(bytes(raw))
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    with pytest.raises(CheckpointException) as info:
        dcp.load(out, storage_reader=ShardReader(uri))
    error = next(iter(info.value.failures.values()))[0]
    assert isinstance(error, ChecksumMismatchError) and "CRC32C mismatch" in str(error)
