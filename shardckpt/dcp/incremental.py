"""Incremental saves: an item whose bytes an earlier checkpoint already holds is not
uploaded again; the new manifest points at the earlier stream instead.

An item's content identity is (length, CRC32C, XXH3-64): 96 bits, so two different chunks of
one length collide by accident with probability 2^-96. Neither hash is cryptographic, which
is fine for one's own training state (only accidents matter) and far cheaper: CRC32C is
computed for every item anyway (~9 GB/s here), XXH3 (~5 GB/s here, 2.4x zlib's CRC-32, which
cost a fully changing state 21% on a local store) runs for items whose length and CRC32C match
an item of the base (before upload, to decide) and for uploaded items beside their upload (so
the next save can match them). A state that changes completely thus pays one CRC32C pass
before the upload instead of beside it, and XXH3 beside it.

Everything incremental is here: the base by content (:class:`ContentIndex`) and a rank's
write against it (:func:`write_incremental`); the manifest records reused streams with their
``home`` (``records.py``), and deletion keeps what a committed manifest reuses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from shardckpt._util.bytes import crc32c_of, each_view, xxh3_of
from shardckpt.dcp.commit import RankReport
from shardckpt.format.manifest import Manifest
from shardckpt.format.records import RankItems, StreamRecord

# How a writer uploads views as its rank's stream: (pool, views, checksum of each view) ->
# (the stream, each view's offset in it, each view's checksum).
Upload = Callable[
    [ThreadPoolExecutor, list[memoryview], Callable[[Sequence[memoryview]], list[int]]],
    tuple[StreamRecord, list[int], list[int]],
]


@dataclass(frozen=True)
class Reuse:
    """Where reusable bytes are: ``stream`` (its ``home`` set), offset, and their XXH3-64."""

    stream: StreamRecord
    offset: int
    xxh3: int


class ContentIndex:
    """The items of a committed checkpoint (the base of an incremental save) by content.
    ``home`` is the base checkpoint's name under the root; streams the base itself reuses
    keep their own homes, so chains of reuse stay one hop deep."""

    def __init__(self, manifest: Manifest | None = None, home: str = "") -> None:
        """``manifest`` None: nothing to reuse yet (the first save still records hashes)."""
        self._entries: dict[tuple[int, int], Reuse] = {}
        if manifest is None:
            return
        streams = [replace(s, home=s.home or home) for s in manifest.streams]
        for table in manifest.items:
            for _, _, stream, offset, length, crc, xxh3 in table.rows():
                if length and xxh3 is not None:  # no hash: not from an incremental save
                    self._entries[(length, crc)] = Reuse(streams[stream], offset, xxh3)

    def candidate(self, length: int, crc32c: int) -> Reuse | None:
        """The earlier item with this length and CRC32C, if any (to confirm by XXH3)."""
        return self._entries.get((length, crc32c)) if length else None

    def __len__(self) -> int:
        return len(self._entries)


def write_incremental(
    pool: ThreadPoolExecutor,
    base: ContentIndex,
    upload: Upload,
    rank: int,
    fqns: list[str],
    chunks: list[list[int] | None],
    views: list[memoryview],
    lengths: list[int],
) -> tuple[RankReport, int]:
    """Write one rank's items of an incremental save: those whose content ``base`` holds
    point at it, the others are uploaded as the rank's stream by ``upload`` (their XXH3-64
    computed beside it, for the next save to match). Returns the rank's report and the bytes
    it reused instead of uploading."""
    crcs = each_view(pool, crc32c_of, views)
    candidates = [base.candidate(len(v), c) for v, c in zip(views, crcs, strict=True)]
    maybe = [i for i, found in enumerate(candidates) if found is not None]
    confirm = each_view(pool, xxh3_of, [views[i] for i in maybe])
    hashes: list[int] = [0] * len(views)
    reused: dict[int, Reuse] = {}
    for i, xxh3 in zip(maybe, confirm, strict=True):
        hashes[i] = xxh3
        found = candidates[i]
        if found is not None and found.xxh3 == xxh3:
            reused[i] = found
    fresh = [i for i in range(len(views)) if i not in reused]
    stream, fresh_offsets, fresh_hashes = upload(pool, [views[i] for i in fresh], xxh3_of)
    # Item streams are local here: 0 is this rank's stream, k > 0 is foreign[k - 1].
    foreign: dict[StreamRecord, int] = {}
    item_streams, offsets = [0] * len(views), [0] * len(views)
    for i, offset, xxh3 in zip(fresh, fresh_offsets, fresh_hashes, strict=True):
        offsets[i], hashes[i] = offset, xxh3
    for i, found in reused.items():
        item_streams[i] = foreign.setdefault(found.stream, len(foreign) + 1)
        offsets[i] = found.offset
    items = RankItems(rank, item_streams, fqns, chunks, offsets, lengths, crcs, hashes)
    return RankReport(stream, items, tuple(foreign)), sum(lengths[i] for i in reused)
