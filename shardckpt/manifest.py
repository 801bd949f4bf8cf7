"""The manifest: the single commit point of a checkpoint, and plain data.

It is JSON (never a pickle, so a manifest from an untrusted bucket cannot run code) holding a
format version, the world size, creation time, DCP's ``Metadata`` (tensor shapes, dtypes,
chunks, planner data), where every saved item lives, and every data object's size and CRC32C.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from shardckpt._gc import gc_paused
from shardckpt.errors import ManifestError
from shardckpt.layout import MANIFEST_NAME

FORMAT = "shardckpt"
FORMAT_VERSION = 2


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


@dataclass
class Manifest:
    metadata: Metadata
    streams: list[StreamRecord]
    items: list[RankItems]
    world_size: int
    created: float = field(default_factory=time.time)
    attributes: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @cached_property
    def locations(self) -> dict[MetadataIndex, ItemLocation]:
        """Every item's location, keyed as DCP's read items name them (built on first use)."""
        sizes = _SizeCache()
        out: dict[MetadataIndex, ItemLocation] = {}
        with gc_paused():
            self._add_locations(out, sizes)
        return out

    def _add_locations(self, out: dict[MetadataIndex, ItemLocation], sizes: _SizeCache) -> None:
        for table in self.items:
            for fqn, chunk, stream, offset, length, crc, _ in table.rows():
                if chunk is None:
                    out[MetadataIndex(fqn)] = ItemLocation(stream, offset, length, crc)
                    continue
                half = len(chunk) // 2
                index = MetadataIndex(fqn, sizes(chunk[:half]))
                out[index] = ItemLocation(stream, offset, length, crc, sizes(chunk[half:]))

    @property
    def objects(self) -> list[ObjectRecord]:
        return [o for s in self.streams for o in s.objects]

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    def to_json(self) -> bytes:
        md = self.metadata
        tensors = _encode_state_dict_metadata(md.state_dict_metadata)
        ids = {fqn: i for i, fqn in enumerate(tensors["tensors"])}
        try:
            items = [
                {
                    "rank": t.rank,
                    "stream": t.stream,
                    "fqn": [ids[f] for f in t.fqns],
                    "chunk": t.chunks,
                    "offset": t.offsets,
                    "length": t.lengths,
                    "crc32c": t.crcs,
                    **({} if t.hashes is None else {"xxh3": t.hashes}),
                }
                for t in self.items
            ]
        except KeyError as exc:
            raise ManifestError(
                f"item {exc.args[0]!r} was written but is not in the plan's metadata"
            ) from None
        doc = {
            "format": FORMAT,
            "version": self.version,
            "world_size": self.world_size,
            "created": self.created,
            "attributes": self.attributes,
            "dcp_version": md.version,
            **tensors,
            "planner_data": _encode_plain(md.planner_data),
            "storage_meta": None
            if md.storage_meta is None
            else _encode_storage_meta(md.storage_meta),
            "streams": [
                {
                    "rank": s.rank,
                    "object_size": s.object_size,
                    "objects": [[o.key, o.size, o.crc32c] for o in s.objects],
                    **({"home": s.home} if s.home else {}),
                }
                for s in self.streams
            ],
            "items": items,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> Manifest:
        """Parse a manifest, raising :class:`ManifestError` naming ``uri`` on any problem."""
        with gc_paused():
            return cls._from_json(data, uri)

    @classmethod
    def _from_json(cls, data: bytes, uri: str) -> Manifest:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(
                f"{uri} is not a shardckpt manifest: invalid JSON ({exc})"
            ) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ManifestError(
                f"{uri} is not a shardckpt manifest (no 'format': '{FORMAT}' field)"
            )
        version = doc.get("version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{uri} has manifest version {version!r}; this shardckpt reads version {FORMAT_VERSION} "
                "(upgrade shardckpt to read newer checkpoints)"
            )
        try:
            streams = [
                StreamRecord(
                    int(s["rank"]),
                    int(s["object_size"]),
                    tuple(ObjectRecord(str(k), int(n), int(c)) for k, n, c in s["objects"]),
                    check_home(s.get("home", "")),
                )
                for s in doc["streams"]
            ]
            state_dict_metadata, names = _decode_state_dict_metadata(doc)
            items = [_decode_items(t, names, len(streams)) for t in doc["items"]]
            _add_chunks(state_dict_metadata, items)
            metadata = Metadata(
                state_dict_metadata=state_dict_metadata,
                planner_data=_decode_plain(doc["planner_data"]),
                storage_meta=None
                if doc["storage_meta"] is None
                else StorageMeta(**doc["storage_meta"]),
                version=doc["dcp_version"],
            )
            return cls(
                metadata,
                streams,
                items,
                int(doc["world_size"]),
                float(doc["created"]),
                dict(doc["attributes"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ManifestError(
                f"{uri} is a corrupt manifest: {type(exc).__name__}: {exc}"
            ) from None


def _decode_items(doc: dict[str, Any], names: list[str], streams: int) -> RankItems:
    stream = doc["stream"]
    used = _naturals(stream, "streams") if isinstance(stream, list) else [int(stream)]
    if used and not (0 <= min(used) and max(used) < streams):
        raise ValueError(f"rank {doc['rank']}'s items are in a stream that is not listed")
    ids = _naturals(doc["fqn"], "names")
    if ids and max(ids) >= len(names):
        raise ValueError(f"rank {doc['rank']}'s items name value {max(ids)} of {len(names)}")
    return RankItems(
        int(doc["rank"]),
        stream,
        [names[i] for i in ids],
        doc["chunk"],
        _naturals(doc["offset"], "offsets"),
        _naturals(doc["length"], "lengths"),
        _naturals(doc["crc32c"], "checksums"),
        None if doc.get("xxh3") is None else _naturals(doc["xxh3"], "hashes"),
    )


def check_home(home: Any) -> str:
    """A stream's home: "" or one plain name (a sibling checkpoint), never a path."""
    if not isinstance(home, str) or (
        home and ("/" in home or "\\" in home or home in (".", "..") or home == MANIFEST_NAME)
    ):
        raise ValueError(f"stream home {home!r} is not the name of a sibling checkpoint")
    return home


def _naturals(values: Any, what: str) -> list[int]:
    if not isinstance(values, list) or not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"item {what} are not a list of non-negative integers")
    return values


def _add_chunks(
    state_dict_metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata],
    items: list[RankItems],
) -> None:
    """Rebuild every tensor's chunk list from the items (the manifest stores each chunk once,
    with its item)."""
    sizes = _SizeCache()
    for table in items:
        for fqn, chunk in zip(table.fqns, table.chunks, strict=True):
            md = state_dict_metadata[fqn]
            if isinstance(md, BytesStorageMetadata) or chunk is None:
                if isinstance(md, BytesStorageMetadata) and chunk is None:
                    continue
                raise ValueError(
                    f"{fqn!r} is stored as {'a value' if chunk is None else 'a tensor chunk'} but described otherwise"
                )
            half = len(md.size)
            if len(chunk) != 2 * half:
                raise ValueError(
                    f"a chunk of {fqn!r} has {len(chunk)} bounds for {half} dimensions"
                )
            md.chunks.append(ChunkStorageMetadata(sizes(chunk[:half]), sizes(chunk[half:])))


class _SizeCache:
    """``torch.Size`` per distinct shape: shapes repeat, and building a Size is slow."""

    def __init__(self) -> None:
        self._sizes: dict[tuple[int, ...], torch.Size] = {}

    def __call__(self, values: list[int]) -> torch.Size:
        key = tuple(values)
        found = self._sizes.get(key)
        if found is None:
            if not all(isinstance(v, int) for v in key):
                raise ValueError(f"{list(values)} is not a list of integers")
            found = self._sizes[key] = torch.Size(key)
        return found


def _name(value: Any) -> str:
    return str(value).removeprefix("torch.")


def _encode_state_dict_metadata(items: dict[str, Any]) -> dict[str, Any]:
    """``props``: the distinct tensor properties (a model has a handful); ``tensors``: per
    name ``[props index, size]``, or ``"bytes"`` for other values. Chunks are stored with
    their items."""
    props: dict[tuple[Any, ...], int] = {}
    tensors: dict[str, Any] = {}
    for fqn, md in items.items():
        if isinstance(md, BytesStorageMetadata):
            tensors[fqn] = "bytes"
            continue
        p = md.properties
        key = (
            _name(p.dtype),
            _name(p.layout),
            p.requires_grad,
            _name(p.memory_format),
            p.pin_memory,
        )
        index = props.setdefault(key, len(props))
        tensors[fqn] = [index, list(md.size)]
    return {"props": [list(k) for k in props], "tensors": tensors}


def _torch_attr(name: str, kind: type) -> Any:
    # Only names of torch dtypes/layouts/memory formats are accepted: nothing else is looked up.
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, kind):
        raise ValueError(f"{name!r} is not a torch {kind.__name__}")
    return value


def _decode_state_dict_metadata(
    doc: dict[str, Any],
) -> tuple[dict[str, TensorStorageMetadata | BytesStorageMetadata], list[str]]:
    """The values' descriptions (tensors without their chunks yet), and their names in order."""
    props = [
        TensorProperties(
            dtype=_torch_attr(dtype, torch.dtype),
            layout=_torch_attr(layout, torch.layout),
            requires_grad=bool(requires_grad),
            memory_format=_torch_attr(memory_format, torch.memory_format),
            pin_memory=bool(pin_memory),
        )
        for dtype, layout, requires_grad, memory_format, pin_memory in doc["props"]
    ]
    out: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for fqn, entry in doc["tensors"].items():
        if entry == "bytes":
            out[fqn] = BytesStorageMetadata()
            continue
        index, shape = entry
        out[fqn] = TensorStorageMetadata(props[index], torch.Size(shape), [])
    return out, list(out)


def _encode_storage_meta(meta: StorageMeta) -> dict[str, Any]:
    return {
        "checkpoint_id": None if meta.checkpoint_id is None else str(meta.checkpoint_id),
        "save_id": meta.save_id,
        "load_id": meta.load_id,
        "modules": list(meta.modules),
    }


def _encode_plain(value: Any) -> Any:
    """JSON for planner data: plain values, lists, str-keyed dicts; tuples are tagged. DCP's
    own planner data, a map of keys to paths (tuples), gets one compact tag."""
    if (
        isinstance(value, dict)
        and value
        and all(isinstance(k, str) and _is_path(v) for k, v in value.items())
    ):
        return {"__paths__": {k: list(v) for k, v in value.items()}}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode_plain(v) for v in value]}
    if isinstance(value, list):
        return [_encode_plain(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode_plain(v) for k, v in value.items()}
    raise TypeError(f"planner data of type {type(value).__name__} cannot be stored in a manifest")


def _decode_plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_plain(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode_plain(v) for v in value["__tuple__"])
        if set(value) == {"__paths__"}:
            return {k: tuple(v) for k, v in value["__paths__"].items()}
        return {k: _decode_plain(v) for k, v in value.items()}
    return value


def _is_path(value: Any) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(p, str | int) and not isinstance(p, bool) for p in value
    )
