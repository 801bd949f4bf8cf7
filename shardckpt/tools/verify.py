"""Check a checkpoint without loading it into a model: everything a load would check, without
a model to load into.

The manifest is read and validated exactly as a load reads it (so what a load refuses, this
refuses, with the same error); then every object is read back in parallel, in 16 MiB reads,
and its size and CRC32C compared with the manifest, and so is every item's CRC32C (what a
load checks): the CRC32C of each piece of an item within an object is taken beside the
object's, and the pieces of an item that spans objects are combined (``crc32c_combine``)
instead of read twice. Progress goes to an ``on_bytes`` callback (the CLI draws a bar with
it): a library never prints.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from shardckpt._util.bytes import crc32c, crc32c_combine, empty_bytes
from shardckpt.errors import StoreError
from shardckpt.format.layout import Layout
from shardckpt.format.manifest import Manifest, read_manifest
from shardckpt.format.records import ObjectRecord
from shardckpt.store import ObjectStore

_READ_CHUNK = 16 << 20


@dataclass
class VerifyReport:
    """``problems`` maps an object's URI to what is wrong with it; empty means intact."""

    objects: int = 0
    bytes: int = 0
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


# An item's bytes (stream, offset, length), and a piece of them in one object: (the item's
# bytes, offset in the object, length).
_Range = tuple[int, int, int]
_Piece = tuple[_Range, int, int]


def verify_checkpoint(
    store: ObjectStore,
    layout: Layout,
    *,
    num_threads: int = 8,
    on_bytes: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Read every object of the checkpoint at ``layout`` and check it and its items against
    the manifest. Raises the manifest's errors (missing, incomplete, corrupt or inconsistent
    manifest) as a load would. ``on_bytes(n, total)`` is called, from the reading threads,
    after each read of ``n`` bytes of the ``total`` to read."""
    manifest = read_manifest(store, layout)
    report = VerifyReport(len(manifest.objects), manifest.total_bytes)
    keys = layout.object_keys(manifest.streams)
    ranges = _item_ranges(manifest)
    firsts = _first_objects(manifest)
    pieces = _pieces_per_object(manifest, ranges, firsts)
    with ThreadPoolExecutor(num_threads) as pool:
        check = partial(_check_object, store, on_bytes=on_bytes, total=manifest.total_bytes)
        results = list(pool.map(check, keys, manifest.objects, pieces))
    sums: dict[_Range, list[tuple[int, int]]] = defaultdict(list)
    damaged: set[_Range] = set()  # items in a damaged object: the object is reported
    for key, (problem, piece_sums), mine in zip(keys, results, pieces, strict=True):
        if problem is not None:
            report.problems[store.uri(key)] = problem
            damaged.update(where for where, _, _ in mine)
            continue
        for (where, _, n), value in zip(mine, piece_sums, strict=True):
            sums[where].append((value, n))
    for where, (fqn, expected) in ranges.items():
        pieces = sums[where]
        actual = pieces[0][0] if pieces else 0
        for value, n in pieces[1:]:
            actual = crc32c_combine(actual, value, n)
        if where in damaged or actual == expected:
            continue
        s, offset, length = where
        stream = manifest.streams[s]
        index = firsts[s] + min(offset // stream.object_size, len(stream.objects) - 1)
        uri = store.uri(keys[index] if stream.objects else layout.manifest_key)
        problem = (
            f"item {fqn!r} (stream bytes {offset}-{offset + length - 1}): CRC32C "
            f"{actual:#010x}, manifest says {expected:#010x}"
        )
        report.problems[uri] = "; ".join(filter(None, [report.problems.get(uri), problem]))
    return report


def _check_object(
    store: ObjectStore,
    key: str,
    obj: ObjectRecord,
    mine: list[_Piece],
    on_bytes: Callable[[int, int], None] | None,
    total: int,
) -> tuple[str | None, list[int]]:
    """Read the object at ``key`` and check it against ``obj``: what is wrong with it (None:
    nothing), and the CRC32C of each of the item pieces ``mine`` in it."""
    try:
        info = store.head(key)
        if info is None:
            return "missing", []
        if info.size != obj.size:
            return f"size {info.size}, manifest says {obj.size}", []
        checksum, sums = 0, [0] * len(mine)
        ends = [at + n for _, at, n in mine]  # ascending: the pieces are disjoint
        for start in range(0, obj.size, _READ_CHUNK):
            chunk = empty_bytes(min(_READ_CHUNK, obj.size - start))
            store.get_into(key, start, [chunk])
            checksum = crc32c(chunk, checksum)
            if on_bytes is not None:
                on_bytes(len(chunk), total)
            end = start + len(chunk)
            i = bisect_right(ends, start)  # the first piece that ends in this chunk or later
            while i < len(mine) and mine[i][1] < end:
                lo, hi = max(mine[i][1], start), min(ends[i], end)
                sums[i] = crc32c(chunk[lo - start : hi - start], sums[i])
                i += 1
        if checksum != obj.crc32c:
            return f"CRC32C {checksum:#010x}, manifest says {obj.crc32c:#010x}", []
    except StoreError as exc:
        return str(exc), []
    return None, sums


def _item_ranges(manifest: Manifest) -> dict[_Range, tuple[str, int]]:
    """Every distinct item byte range: one of its items' names, and the CRC32C the manifest
    records (the same for items of the same bytes: the manifest's checks make sure)."""
    out = {}
    for table in manifest.items:
        for fqn, _, stream, offset, length, crc, _ in table.rows():
            out[(stream, offset, length)] = (fqn, crc)
    return out


def _first_objects(manifest: Manifest) -> list[int]:
    """The index in ``manifest.objects`` of each stream's first object."""
    firsts, count = [], 0
    for stream in manifest.streams:
        firsts.append(count)
        count += len(stream.objects)
    return firsts


def _pieces_per_object(
    manifest: Manifest, ranges: dict[_Range, tuple[str, int]], firsts: list[int]
) -> list[list[_Piece]]:
    """For every object (in ``manifest.objects`` order), the pieces of item ranges in it."""
    out: list[list[_Piece]] = [[] for _ in manifest.objects]
    for where in sorted(ranges):
        s, offset, length = where
        stream = manifest.streams[s]
        for _, start, n, at in stream.pieces(offset, length):
            out[firsts[s] + (offset + at) // stream.object_size].append((where, start, n))
    return out
