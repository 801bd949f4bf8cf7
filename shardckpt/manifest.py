"""The manifest: the single commit point of a checkpoint, and plain data.

It is JSON (never a pickle, so a manifest from an untrusted bucket cannot run code) holding a
format version, the world size, creation time, DCP's ``Metadata`` (tensor shapes, dtypes,
chunks, planner data), where every saved item lives, and every data object's size and CRC32C.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
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

from shardckpt.errors import ManifestError

FORMAT = "shardckpt"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ObjectRecord:
    """One data object: its key (relative to the store root), size and CRC32C."""

    key: str
    size: int
    crc32c: int


@dataclass(frozen=True)
class StreamRecord:
    """The bytes one rank wrote in one save: a byte stream cut into objects of
    ``object_size`` bytes (the last may be shorter)."""

    rank: int
    object_size: int
    objects: tuple[ObjectRecord, ...]

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
    ``offset`` of rank ``rank``'s stream, with their CRC32C."""

    rank: int
    offset: int
    length: int
    crc32c: int


@dataclass
class Manifest:
    metadata: Metadata
    streams: dict[int, StreamRecord]
    world_size: int
    created: float = field(default_factory=time.time)
    attributes: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def locations(self) -> dict[MetadataIndex, ItemLocation]:
        return self.metadata.storage_data

    @property
    def objects(self) -> list[ObjectRecord]:
        return [o for s in self.streams.values() for o in s.objects]

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    def to_json(self) -> bytes:
        md = self.metadata
        doc = {
            "format": FORMAT,
            "version": self.version,
            "world_size": self.world_size,
            "created": self.created,
            "attributes": self.attributes,
            "dcp_version": md.version,
            **_encode_state_dict_metadata(md.state_dict_metadata),
            "planner_data": _encode_plain(md.planner_data),
            "storage_meta": None
            if md.storage_meta is None
            else _encode_storage_meta(md.storage_meta),
            "items": [
                [
                    i.fqn,
                    None if i.offset is None else list(i.offset),
                    i.index,
                    loc.rank,
                    loc.offset,
                    loc.length,
                    loc.crc32c,
                ]
                for i, loc in md.storage_data.items()
            ],
            "streams": [
                {
                    "rank": s.rank,
                    "object_size": s.object_size,
                    "objects": [[o.key, o.size, o.crc32c] for o in s.objects],
                }
                for s in self.streams.values()
            ],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> Manifest:
        """Parse a manifest, raising :class:`ManifestError` naming ``uri`` on any problem."""
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
            streams = {
                int(s["rank"]): StreamRecord(
                    int(s["rank"]),
                    int(s["object_size"]),
                    tuple(ObjectRecord(str(k), int(n), int(c)) for k, n, c in s["objects"]),
                )
                for s in doc["streams"]
            }
            locations = {
                MetadataIndex(fqn, None if off is None else torch.Size(off), idx): ItemLocation(
                    r, o, n, c
                )
                for fqn, off, idx, r, o, n, c in doc["items"]
            }
            metadata = Metadata(
                state_dict_metadata=_decode_state_dict_metadata(doc),
                planner_data=_decode_plain(doc["planner_data"]),
                storage_data=locations,
                storage_meta=None
                if doc["storage_meta"] is None
                else StorageMeta(**doc["storage_meta"]),
                version=doc["dcp_version"],
            )
            manifest = cls(
                metadata,
                streams,
                int(doc["world_size"]),
                float(doc["created"]),
                dict(doc["attributes"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(
                f"{uri} is a corrupt manifest: {type(exc).__name__}: {exc}"
            ) from None
        for loc in locations.values():
            if loc.rank not in streams:
                raise ManifestError(
                    f"{uri} is a corrupt manifest: an item refers to rank {loc.rank}, which wrote nothing"
                )
        return manifest


def _name(value: Any) -> str:
    return str(value).removeprefix("torch.")


def _encode_state_dict_metadata(items: dict[str, Any]) -> dict[str, Any]:
    """``props``: the distinct tensor properties (a model has a handful); ``tensors``: per
    key ``[props index, size, [[offsets, sizes], ...]]``, or ``"bytes"`` for other values.
    The table keeps a 100k-tensor manifest small and fast to parse."""
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
        tensors[fqn] = [index, list(md.size), [[list(c.offsets), list(c.sizes)] for c in md.chunks]]
    return {"props": [list(k) for k in props], "tensors": tensors}


def _torch_attr(name: str, kind: type) -> Any:
    # Only names of torch dtypes/layouts/memory formats are accepted: nothing else is looked up.
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, kind):
        raise ValueError(f"{name!r} is not a torch {kind.__name__}")
    return value


def _decode_state_dict_metadata(
    doc: dict[str, Any],
) -> dict[str, TensorStorageMetadata | BytesStorageMetadata]:
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
    sizes: dict[tuple[int, ...], torch.Size] = {}  # shapes repeat; torch.Size() is slow to build

    def size(values: list[int]) -> torch.Size:
        key = tuple(int(v) for v in values)
        found = sizes.get(key)
        if found is None:
            found = sizes[key] = torch.Size(key)
        return found

    out: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for fqn, entry in doc["tensors"].items():
        if entry == "bytes":
            out[fqn] = BytesStorageMetadata()
            continue
        index, shape, chunks = entry
        out[fqn] = TensorStorageMetadata(
            props[index], size(shape), [ChunkStorageMetadata(size(o), size(s)) for o, s in chunks]
        )
    return out


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
