"""The manifest: the single commit point of a checkpoint, and plain data.

It is JSON (never a pickle, so a manifest from an untrusted bucket cannot run code) holding a
format version, the world size, creation time, DCP's ``Metadata`` (tensor shapes, dtypes,
chunks, planner data), where every saved item lives, and every data object's size and CRC32C.

Version 3 ends with the CRC32C of the rest (``seal``), so a flipped bit is reported as such;
version 2 (no checksum) is still read. Either way every field is checked on its own
(``manifest_fields.py``) and against the others (``manifest_check.py``) before anything
allocates or requests by it. The records it holds are ``records.py``'s.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

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
from shardckpt.format.manifest_fields import (
    Fields,
    add_chunks,
    decode_items,
    decode_plain,
    decode_state_dict_metadata,
    decode_storage_meta,
    decode_streams,
    encode_plain,
    encode_state_dict_metadata,
    encode_storage_meta,
)
from shardckpt.format.records import ItemLocation, ObjectRecord, RankItems, SizeCache, StreamRecord

if TYPE_CHECKING:
    from shardckpt.store import ObjectStore

FORMAT = "shardckpt"
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
SEAL_FIELD = "manifest_crc32c"


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
        sizes = SizeCache()
        out: dict[MetadataIndex, ItemLocation] = {}
        with gc_paused():
            self._add_locations(out, sizes)
        return out

    def _add_locations(self, out: dict[MetadataIndex, ItemLocation], sizes: SizeCache) -> None:
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
        tensors = encode_state_dict_metadata(md.state_dict_metadata)
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
            "planner_data": encode_plain(md.planner_data),
            "storage_meta": None
            if md.storage_meta is None
            else encode_storage_meta(md.storage_meta),
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
        fields = Fields(uri)
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
        cls, doc: dict[str, Any], version: int, fields: Fields
    ) -> tuple[Manifest, list[str]]:
        """Every field of ``doc``, type- and range-checked on its own."""
        world_size = fields.nat(fields.get(doc, "world_size"), "world_size")
        if world_size == 0:
            fields.fail("world_size", "0")
        streams = decode_streams(fields.list(doc, "streams"), fields)
        state_dict_metadata, names = decode_state_dict_metadata(doc, fields)
        items = [
            decode_items(t, f"items[{i}]", names, fields)
            for i, t in enumerate(fields.list(doc, "items"))
        ]
        add_chunks(state_dict_metadata, items, fields)
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
            planner_data=decode_plain(fields.get(doc, "planner_data")),
            storage_meta=decode_storage_meta(fields.get(doc, "storage_meta"), fields),
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
