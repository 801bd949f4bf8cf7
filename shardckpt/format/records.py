"""The records a manifest is made of: plain, frozen data.

A save's bytes are per-rank streams cut into objects (:class:`StreamRecord`,
:class:`ObjectRecord`); its items are stored as columns per rank (:class:`RankItems`), cheap
to gather, encode and parse at thousands of ranks x thousands of tensors; a load looks each
item up by its :class:`ItemLocation`. ``manifest.py`` holds them together and
``manifest_fields.py`` turns them into JSON and back.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from shardckpt.errors import ManifestError
from shardckpt.format.manifest_check import INT_END


@dataclass(frozen=True)
class ObjectRecord:
    """One data object: its key (relative to the store root), size and CRC32C."""

    key: str
    size: int
    crc32c: int


@dataclass(frozen=True)
class StreamRecord:
    """The bytes one rank wrote in one save: a byte stream cut into objects of
    ``object_size`` bytes (the last may be shorter). ``home`` is "" for this checkpoint's own
    streams, or the name of the sibling checkpoint (under the same root) that wrote it, for
    a stream an incremental save reuses."""

    rank: int
    object_size: int
    objects: tuple[ObjectRecord, ...]
    home: str = ""

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    def pieces(self, offset: int, length: int) -> list[tuple[ObjectRecord, int, int, int]]:
        """(object, offset in object, length, offset in the requested range) covering
        stream bytes [offset, offset+length)."""
        out = []
        done = 0
        while done < length:
            pos = offset + done
            index = pos // self.object_size
            if index >= len(self.objects):
                raise ManifestError(
                    f"rank {self.rank}'s stream has no byte {pos} (size {self.size})"
                )
            obj = self.objects[index]
            start = pos - index * self.object_size
            n = min(length - done, obj.size - start)
            if n <= 0:
                raise ManifestError(f"object {obj.key} is shorter than the manifest's layout says")
            out.append((obj, start, n, done))
            done += n
        return out


@dataclass(frozen=True)
class ItemLocation:
    """Where one DCP item (a tensor chunk or a serialized value) lives: ``length`` bytes at
    ``offset`` of stream ``stream`` (an index in :attr:`Manifest.streams`), their CRC32C,
    and for a tensor chunk its shape."""

    stream: int
    offset: int
    length: int
    crc32c: int
    chunk: torch.Size | None = None


@dataclass(frozen=True)
class RankItems:
    """One rank's items of a save, as columns: cheap to gather, encode and parse at thousands
    of ranks x thousands of tensors. Item ``i`` is value ``fqns[i]``; ``chunks[i]`` is its
    chunk's offsets then sizes (None for a non-tensor value); its bytes are ``lengths[i]``
    bytes at ``offsets[i]`` of stream ``stream`` (or ``stream[i]``, when an incremental save
    reuses items of earlier streams), with CRC32C ``crcs[i]`` and, in incremental saves, the
    XXH3-64 ``hashes[i]`` that completes the content identity (see ``incremental.py``)."""

    rank: int
    stream: int | list[int]
    fqns: list[str]
    chunks: list[list[int] | None]
    offsets: list[int]
    lengths: list[int]
    crcs: list[int]
    hashes: list[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.fqns)
        columns = [self.chunks, self.offsets, self.lengths, self.crcs]
        columns += [c for c in (self.hashes, self.stream) if isinstance(c, list)]
        if any(len(c) != n for c in columns):
            raise ValueError(f"rank {self.rank}'s item columns differ in length")

    def rows(self) -> Iterator[tuple[str, list[int] | None, int, int, int, int, int | None]]:
        """Every item as (name, chunk, stream, offset, length, CRC32C, hash or None)."""
        streams = self.stream if isinstance(self.stream, list) else itertools.repeat(self.stream)
        hashes = itertools.repeat(None) if self.hashes is None else self.hashes
        columns = (self.fqns, self.chunks, streams, self.offsets, self.lengths, self.crcs, hashes)
        return zip(*columns, strict=False)  # repeats are endless; __post_init__ checks lengths


class SizeCache:
    """``torch.Size`` per distinct shape: shapes repeat, and building (and checking) a Size
    is slow."""

    def __init__(self) -> None:
        self._sizes: dict[tuple[int, ...], torch.Size] = {}

    def __call__(self, values: list[int]) -> torch.Size:
        key = tuple(values)
        found = self._sizes.get(key)
        if found is None:
            if not all(type(v) is int and 0 <= v < INT_END for v in key):
                raise ValueError(f"{list(values)} is not a list of integers in [0, 2^63)")
            found = self._sizes[key] = torch.Size(key)
        return found
