"""Check a checkpoint without loading it into a model: every object is read back in parallel
and its size and CRC32C compared with the manifest."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shardckpt._bytes import crc32c, empty_bytes
from shardckpt.errors import StoreError
from shardckpt.layout import Layout
from shardckpt.manifest import ObjectRecord
from shardckpt.reader import read_manifest
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


def verify_checkpoint(store: ObjectStore, layout: Layout, *, num_threads: int = 8) -> VerifyReport:
    """Read every object of the checkpoint at ``layout`` and check it against the manifest.
    Raises the manifest's errors (missing, incomplete, corrupt manifest) as a load would."""
    manifest = read_manifest(store, layout)
    report = VerifyReport(len(manifest.objects), manifest.total_bytes)

    def check(key: str, obj: ObjectRecord) -> tuple[str, str | None]:
        uri = store.uri(key)
        try:
            info = store.head(key)
            if info is None:
                return uri, "missing"
            if info.size != obj.size:
                return uri, f"size {info.size}, manifest says {obj.size}"
            checksum = 0
            for start in range(0, obj.size, _READ_CHUNK):
                chunk = empty_bytes(min(_READ_CHUNK, obj.size - start))
                store.get_into(key, start, [chunk])
                checksum = crc32c(chunk, checksum)
            if checksum != obj.crc32c:
                return uri, f"CRC32C {checksum:#010x}, manifest says {obj.crc32c:#010x}"
        except StoreError as exc:
            return uri, str(exc)
        return uri, None

    with ThreadPoolExecutor(num_threads) as pool:
        keys = layout.object_keys(manifest.streams)
        for uri, problem in pool.map(check, keys, manifest.objects):
            if problem is not None:
                report.problems[uri] = problem
    return report
