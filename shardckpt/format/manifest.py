"""The manifest: the single commit point of a checkpoint, and plain data.

It is JSON (never a pickle, so a manifest from an untrusted bucket cannot run code) holding a
format version, the world size, creation time, DCP's ``Metadata`` (tensor shapes, dtypes,
chunks, planner data), where every saved item lives, and every data object's size and CRC32C.

Version 3 ends with the CRC32C of the rest (``seal``), so a flipped bit is reported as such;
version 2 (no checksum) is still read. Either way every field is checked on its own and
against the others (``manifest_check.py``) before anything allocates or requests by it.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn

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

from shardckpt._util.bytes import crc32c
from shardckpt._util.gc_pause import gc_paused
from shardckpt.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    ManifestError,
    ObjectNotFoundError,
)
from shardckpt.format.layout import Layout
from shardckpt.format.manifest_check import INT_END, check_manifest

if TYPE_CHECKING:
    from shardckpt.store import ObjectStore

FORMAT = "shardckpt"
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
SEAL_FIELD = "manifest_crc32c"


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
            "version": FORMAT_VERSION,
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
        return seal(json.dumps(doc, separators=(",", ":")).encode())

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> Manifest:
        """Parse a manifest, raising :class:`ManifestError` naming ``uri`` (and the field) on
        any problem: a checksum that does not match, a field of the wrong type or range, or
        fields that disagree with each other (``manifest_check.py``)."""
        with gc_paused():
            return cls._from_json(data, uri)

    @classmethod
    def _from_json(cls, data: bytes, uri: str) -> Manifest:
        sealed = _check_seal(data, uri)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ManifestError(
                f"{uri} is not a shardckpt manifest: invalid JSON ({exc})"
            ) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ManifestError(
                f"{uri} is not a shardckpt manifest (no 'format': '{FORMAT}' field)"
            )
        version = doc.get("version")
        if type(version) is not int or version not in READ_VERSIONS:
            raise ManifestError(
                f"{uri} has manifest version {version!r}; this shardckpt reads versions "
                f"{' and '.join(map(str, READ_VERSIONS))} (upgrade shardckpt to read newer checkpoints)"
            )
        fields = _Fields(uri)
        if version >= 3 and not sealed:
            fields.fail(SEAL_FIELD, "missing: a version 3 manifest is sealed by its checksum")
        try:
            manifest, names = cls._decode(doc, version, fields)
        except RecursionError:
            fields.fail("planner_data", "nested too deeply")
        check_manifest(manifest, names, fields.fail)
        return manifest

    @classmethod
    def _decode(
        cls, doc: dict[str, Any], version: int, fields: _Fields
    ) -> tuple[Manifest, list[str]]:
        """Every field of ``doc``, type- and range-checked on its own."""
        world_size = fields.nat(fields.get(doc, "world_size"), "world_size")
        if world_size == 0:
            fields.fail("world_size", "0")
        streams = _decode_streams(fields.list(doc, "streams"), fields)
        state_dict_metadata, names = _decode_state_dict_metadata(doc, fields)
        items = [
            _decode_items(t, f"items[{i}]", names, fields)
            for i, t in enumerate(fields.list(doc, "items"))
        ]
        _add_chunks(state_dict_metadata, items, fields)
        created = fields.get(doc, "created")
        if type(created) is not float and not (type(created) is int and abs(created) < INT_END):
            fields.fail("created", f"{created!r} is not a time")
        attributes = fields.get(doc, "attributes")
        if not isinstance(attributes, dict):
            fields.fail("attributes", f"{attributes!r} is not a map")
        dcp_version = fields.get(doc, "dcp_version")
        if not (dcp_version is None or isinstance(dcp_version, str)):
            fields.fail("dcp_version", f"{dcp_version!r} is not a version")
        metadata = Metadata(
            state_dict_metadata=state_dict_metadata,
            planner_data=_decode_plain(fields.get(doc, "planner_data")),
            storage_meta=_decode_storage_meta(fields.get(doc, "storage_meta"), fields),
            version=dcp_version,
        )
        manifest = cls(metadata, streams, items, world_size, float(created), attributes, version)
        return manifest, names


def read_manifest(store: ObjectStore, layout: Layout) -> Manifest:
    """Fetch and parse the manifest of the checkpoint at ``layout`` in ``store``; see
    :func:`fetch_manifest`."""
    return fetch_manifest(store, layout)[1]


def fetch_manifest(store: ObjectStore, layout: Layout) -> tuple[bytes, Manifest]:
    """The manifest of the checkpoint at ``layout`` in ``store``: its bytes as stored, and
    what they say (for a copy, whose bytes must be the ones checked).

    Raises :class:`CheckpointNotFoundError` if nothing is there,
    :class:`IncompleteCheckpointError` if data but no manifest is, :class:`ManifestError` if
    the manifest is unusable: corrupt, of an unknown version, with fields that disagree, or
    naming objects outside the checkpoint (a stream's home may name only a sibling step).
    """
    key = layout.manifest_key
    try:
        data = store.get(key)
    except ObjectNotFoundError:
        if next(iter(store.list(layout.data_prefix)), None) is not None:
            raise IncompleteCheckpointError(
                f"{store.uri(layout.prefix)} has data but no manifest: the save never committed "
                "(it crashed or is still running); `shardckpt gc` removes such data"
            ) from None
        raise CheckpointNotFoundError(f"no checkpoint at {store.uri(layout.prefix)}") from None
    manifest = Manifest.from_json(data, store.uri(key))
    for i, stream in enumerate(manifest.streams):
        if stream.home and stream.home == layout.name:
            raise ManifestError(
                f"{store.uri(key)} is a corrupt manifest: streams[{i}].home: {stream.home!r} is "
                "this checkpoint itself, not a sibling"
            )
    return data, manifest


def seal(body: bytes) -> bytes:
    """``body`` (a manifest's JSON object) with its CRC32C added as the last field: a
    flipped bit anywhere in a manifest is then found before any field of it is used."""
    return body[:-1] + b',"%s":"%08x"}' % (SEAL_FIELD.encode(), crc32c(memoryview(body)))


_SEAL = re.compile(rb',"' + SEAL_FIELD.encode() + rb'":"([0-9a-f]{8})"\}')
_SEAL_LENGTH = len(seal(b"{}")) - 1
_SEALED_HEAD = b'{"format":"%s","version":3,' % FORMAT.encode()


def _check_seal(data: bytes, uri: str) -> bool:
    """Whether ``data`` ends with a seal (version 3); raise if the seal does not match the
    body before it, or if a sealed manifest's seal is damaged beyond recognition."""
    found = _SEAL.fullmatch(data, max(0, len(data) - _SEAL_LENGTH))
    if found is None:
        if data.startswith(_SEALED_HEAD):
            raise ManifestError(
                f"{uri} is a corrupt manifest: checksum mismatch: its {SEAL_FIELD} (the last "
                "field) is missing or damaged"
            )
        return False
    recorded = int(found.group(1), 16)
    actual = crc32c(memoryview(data[: found.start()] + b"}"))
    if actual != recorded:
        raise ManifestError(
            f"{uri} is a corrupt manifest: checksum mismatch: the CRC32C of its body is "
            f"{actual:#010x}, its {SEAL_FIELD} says {recorded:#010x} (a flipped bit or an edit)"
        )
    return True


class _Fields:
    """Reading a manifest document field by field: each problem is one :class:`ManifestError`
    naming the manifest and the field (as ``streams[2].objects[0]``)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def fail(self, field: str, problem: str) -> NoReturn:
        raise ManifestError(f"{self.uri} is a corrupt manifest: {field}: {problem}")

    def get(self, doc: Any, key: str, field: str = "") -> Any:
        if not isinstance(doc, dict) or key not in doc:
            self.fail(field or key, "missing")
        return doc[key]

    def list(self, doc: Any, key: str, field: str = "") -> list[Any]:
        value = self.get(doc, key, field)
        if not isinstance(value, list):
            self.fail(field or key, "not a list")
        return value

    def nat(self, value: Any, field: str, end: int = INT_END) -> int:
        """``value``, an int in [0, ``end``) (by default, one that fits an int64)."""
        if type(value) is not int or not 0 <= value < end:
            self.fail(field, f"{value!r} is not an integer in [0, {end})")
        return value

    def nats(self, values: Any, field: str, end: int = INT_END) -> list[int]:
        """``values``, a list of ints in [0, ``end``)."""
        if not isinstance(values, list):
            self.fail(field, "not a list")
        if not set(map(type, values)) <= {int} or (
            values and not (min(values) >= 0 and max(values) < end)
        ):
            i = next(i for i, v in enumerate(values) if type(v) is not int or not 0 <= v < end)
            self.nat(values[i], f"{field}[{i}]", end)
        return values


def _decode_streams(docs: list[Any], fields: _Fields) -> list[StreamRecord]:
    streams = []
    for i, s in enumerate(docs):
        at = f"streams[{i}]"
        objects = []
        for j, o in enumerate(fields.list(s, "objects", f"{at}.objects")):
            where = f"{at}.objects[{j}]"
            if not (isinstance(o, list) and len(o) == 3 and isinstance(o[0], str)):
                fields.fail(where, "not [key, size, CRC32C]")
            size, crc = (
                fields.nat(o[1], f"{where} size"),
                fields.nat(o[2], f"{where} CRC32C", 1 << 32),
            )
            objects.append(ObjectRecord(o[0], size, crc))
        home = s.get("home", "")
        if not isinstance(home, str):
            fields.fail(f"{at}.home", f"{home!r} is not a name")
        rank = fields.nat(fields.get(s, "rank", f"{at}.rank"), f"{at}.rank")
        object_size = fields.nat(
            fields.get(s, "object_size", f"{at}.object_size"), f"{at}.object_size"
        )
        streams.append(StreamRecord(rank, object_size, tuple(objects), home))
    return streams


def _decode_items(doc: Any, at: str, names: list[str], fields: _Fields) -> RankItems:
    stream = fields.get(doc, "stream", f"{at}.stream")
    if type(stream) is not int:
        stream = fields.nats(stream, f"{at}.stream")
    ids = fields.nats(fields.get(doc, "fqn", f"{at}.fqn"), f"{at}.fqn", len(names))
    chunks = fields.list(doc, "chunk", f"{at}.chunk")  # each checked by _add_chunks
    hashes = doc.get("xxh3")
    columns = {
        "chunk": chunks,
        "offset": fields.nats(fields.get(doc, "offset", f"{at}.offset"), f"{at}.offset"),
        "length": fields.nats(fields.get(doc, "length", f"{at}.length"), f"{at}.length"),
        "crc32c": fields.nats(fields.get(doc, "crc32c", f"{at}.crc32c"), f"{at}.crc32c", 1 << 32),
        "xxh3": None if hashes is None else fields.nats(hashes, f"{at}.xxh3", 1 << 64),
        "stream": stream,
    }
    for key, column in columns.items():
        if isinstance(column, list) and len(column) != len(ids):
            fields.fail(f"{at}.{key}", f"{len(column)} entries for {len(ids)} items")
    return RankItems(
        fields.nat(fields.get(doc, "rank", f"{at}.rank"), f"{at}.rank"),
        stream,
        [names[i] for i in ids],
        chunks,
        columns["offset"],
        columns["length"],
        columns["crc32c"],
        columns["xxh3"],
    )


def _add_chunks(
    state_dict_metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata],
    items: list[RankItems],
    fields: _Fields,
) -> None:
    """Rebuild every tensor's chunk list from the items (the manifest stores each chunk once,
    with its item), checking each item against its value: the kind, the chunk inside the
    tensor, its length that of the chunk's elements (checked once per distinct chunk)."""
    sizes = _SizeCache()
    lengths: dict[tuple[torch.Size, torch.Size, torch.Size, torch.dtype], int] = {}
    for t, table in enumerate(items):
        for k, (fqn, chunk, length) in enumerate(
            zip(table.fqns, table.chunks, table.lengths, strict=True)
        ):
            md = state_dict_metadata[fqn]
            at = f"items[{t}].chunk[{k}] (tensors[{fqn!r}])"
            if isinstance(md, BytesStorageMetadata) or chunk is None:
                if isinstance(md, BytesStorageMetadata) and chunk is None:
                    if length == 0:  # a serialized value is never empty
                        fields.fail(f"items[{t}].length[{k}] ({fqn!r})", "0 bytes for a value")
                    continue
                fields.fail(
                    at,
                    f"stored as {'a value' if chunk is None else 'a tensor chunk'} but described otherwise",
                )
            half = len(md.size)
            if len(chunk) != 2 * half:
                fields.fail(at, f"{len(chunk)} bounds for {half} dimensions")
            offsets, shape = (
                _shape(sizes, chunk[:half], at, fields),
                _shape(sizes, chunk[half:], at, fields),
            )
            key = (offsets, shape, md.size, md.properties.dtype)
            want = lengths.get(key)
            if want is None:
                if any(o + n > d for o, n, d in zip(offsets, shape, md.size, strict=True)):
                    fields.fail(
                        at, f"chunk {chunk} (offsets, sizes) is not inside size {list(md.size)}"
                    )
                want = lengths[key] = math.prod(shape) * md.properties.dtype.itemsize
            if length != want:
                fields.fail(
                    f"items[{t}].length[{k}] (tensors[{fqn!r}])",
                    f"{length} bytes for a chunk of {list(shape)} {_name(md.properties.dtype)} elements",
                )
            md.chunks.append(ChunkStorageMetadata(offsets, shape))


class _SizeCache:
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


def _shape(sizes: _SizeCache, values: Any, field: str, fields: _Fields) -> torch.Size:
    if type(values) is not list:
        fields.fail(field, f"{values!r} is not a list of sizes")
    try:
        return sizes(values)
    except ValueError as exc:
        fields.fail(field, str(exc))


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


def _torch_attr(name: Any, kind: type, field: str, fields: _Fields) -> Any:
    # Only names of torch dtypes/layouts/memory formats are accepted: nothing else is looked up.
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, kind):
        fields.fail(field, f"{name!r} is not a torch {kind.__name__}")
    return value


def _decode_props(doc: Any, at: str, fields: _Fields) -> TensorProperties:
    if not (isinstance(doc, list) and len(doc) == 5):
        fields.fail(at, "not [dtype, layout, requires_grad, memory_format, pin_memory]")
    dtype, layout, requires_grad, memory_format, pin_memory = doc
    if not (isinstance(requires_grad, bool) and isinstance(pin_memory, bool)):
        fields.fail(at, "requires_grad and pin_memory are not booleans")
    return TensorProperties(
        dtype=_torch_attr(dtype, torch.dtype, at, fields),
        layout=_torch_attr(layout, torch.layout, at, fields),
        requires_grad=requires_grad,
        memory_format=_torch_attr(memory_format, torch.memory_format, at, fields),
        pin_memory=pin_memory,
    )


def _decode_state_dict_metadata(
    doc: dict[str, Any], fields: _Fields
) -> tuple[dict[str, TensorStorageMetadata | BytesStorageMetadata], list[str]]:
    """The values' descriptions (tensors without their chunks yet), and their names in order."""
    props = [
        _decode_props(p, f"props[{i}]", fields) for i, p in enumerate(fields.list(doc, "props"))
    ]
    tensors = fields.get(doc, "tensors")
    if not isinstance(tensors, dict):
        fields.fail("tensors", "not a map of names")
    out: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    sizes = _SizeCache()
    for fqn, entry in tensors.items():
        if entry == "bytes":
            out[fqn] = BytesStorageMetadata()
            continue
        at = f"tensors[{fqn!r}]"
        if not (isinstance(entry, list) and len(entry) == 2):
            fields.fail(at, 'not "bytes" or [props index, size]')
        index = fields.nat(entry[0], f"{at} props index", len(props))
        out[fqn] = TensorStorageMetadata(props[index], _shape(sizes, entry[1], at, fields), [])
    return out, list(out)


def _decode_storage_meta(doc: Any, fields: _Fields) -> StorageMeta | None:
    if doc is None:
        return None
    if not (
        isinstance(doc, dict)
        and set(doc) <= {"checkpoint_id", "save_id", "load_id", "modules"}
        and all(
            doc.get(k) is None or isinstance(doc[k], str)
            for k in ("checkpoint_id", "save_id", "load_id")
        )
        and isinstance(doc.get("modules", []), list)
        and all(isinstance(m, str) for m in doc.get("modules", []))
    ):
        fields.fail("storage_meta", "not DCP's storage metadata (ids and module names)")
    return StorageMeta(**doc)


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
        if set(value) == {"__paths__"} and isinstance(value["__paths__"], dict):
            return {
                k: tuple(v) if isinstance(v, list) else v for k, v in value["__paths__"].items()
            }
        return {k: _decode_plain(v) for k, v in value.items()}
    return value


def _is_path(value: Any) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(p, str | int) and not isinstance(p, bool) for p in value
    )
