"""A manifest's parts as JSON and back.

Encoding keeps the document compact (distinct tensor properties once, chunks with their
items, DCP's planner paths under one tag). Decoding reads a document that came from a bucket
field by field: each field is type- and range-checked on its own as it is read, and the first
problem is one :class:`ManifestError` naming the manifest and the field (as
``streams[2].objects[0]``). Checks of fields against each other are ``manifest_check.py``'s.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from shardckpt.errors import ManifestError
from shardckpt.format.manifest_check import INT_END
from shardckpt.format.records import ObjectRecord, RankItems, SizeCache, StreamRecord


class Fields:
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


def decode_streams(docs: list[Any], fields: Fields) -> list[StreamRecord]:
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


def decode_items(doc: Any, at: str, names: list[str], fields: Fields) -> RankItems:
    stream = fields.get(doc, "stream", f"{at}.stream")
    if type(stream) is not int:
        stream = fields.nats(stream, f"{at}.stream")
    ids = fields.nats(fields.get(doc, "fqn", f"{at}.fqn"), f"{at}.fqn", len(names))
    chunks = fields.list(doc, "chunk", f"{at}.chunk")  # each checked by add_chunks
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


def add_chunks(
    state_dict_metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata],
    items: list[RankItems],
    fields: Fields,
) -> None:
    """Rebuild every tensor's chunk list from the items (the manifest stores each chunk once,
    with its item), checking each item against its value: the kind, the chunk inside the
    tensor, its length that of the chunk's elements (checked once per distinct chunk)."""
    sizes = SizeCache()
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


def _shape(sizes: SizeCache, values: Any, field: str, fields: Fields) -> torch.Size:
    if type(values) is not list:
        fields.fail(field, f"{values!r} is not a list of sizes")
    try:
        return sizes(values)
    except ValueError as exc:
        fields.fail(field, str(exc))


def _name(value: Any) -> str:
    return str(value).removeprefix("torch.")


def encode_state_dict_metadata(items: dict[str, Any]) -> dict[str, Any]:
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


def _torch_attr(name: Any, kind: type, field: str, fields: Fields) -> Any:
    # Only names of torch dtypes/layouts/memory formats are accepted: nothing else is looked up.
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, kind):
        fields.fail(field, f"{name!r} is not a torch {kind.__name__}")
    return value


def _decode_props(doc: Any, at: str, fields: Fields) -> TensorProperties:
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


def decode_state_dict_metadata(
    doc: dict[str, Any], fields: Fields
) -> tuple[dict[str, TensorStorageMetadata | BytesStorageMetadata], list[str]]:
    """The values' descriptions (tensors without their chunks yet), and their names in order."""
    props = [
        _decode_props(p, f"props[{i}]", fields) for i, p in enumerate(fields.list(doc, "props"))
    ]
    tensors = fields.get(doc, "tensors")
    if not isinstance(tensors, dict):
        fields.fail("tensors", "not a map of names")
    out: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    sizes = SizeCache()
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


def decode_storage_meta(doc: Any, fields: Fields) -> StorageMeta | None:
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


def encode_storage_meta(meta: StorageMeta) -> dict[str, Any]:
    return {
        "checkpoint_id": None if meta.checkpoint_id is None else str(meta.checkpoint_id),
        "save_id": meta.save_id,
        "load_id": meta.load_id,
        "modules": list(meta.modules),
    }


def encode_plain(value: Any) -> Any:
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
        return {"__tuple__": [encode_plain(v) for v in value]}
    if isinstance(value, list):
        return [encode_plain(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: encode_plain(v) for k, v in value.items()}
    raise TypeError(f"planner data of type {type(value).__name__} cannot be stored in a manifest")


def decode_plain(value: Any) -> Any:
    if isinstance(value, list):
        return [decode_plain(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(decode_plain(v) for v in value["__tuple__"])
        if set(value) == {"__paths__"} and isinstance(value["__paths__"], dict):
            return {
                k: tuple(v) if isinstance(v, list) else v for k, v in value["__paths__"].items()
            }
        return {k: decode_plain(v) for k, v in value.items()}
    return value


def _is_path(value: Any) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(p, str | int) and not isinstance(p, bool) for p in value
    )
