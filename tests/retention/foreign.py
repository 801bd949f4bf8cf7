"""Keys shardckpt did not write, planted under a store, and the check that they survived."""

from __future__ import annotations

from collections.abc import Mapping

from shardckpt.store import ObjectStore

# Names that look like shardckpt's but are not what its layout produces.
LOOKALIKES = (
    "attempt-xyz/rank0-000000",
    "rank0-000000",
    "manifest.json.bak",
    "attempt-0123456789abcdef/notes.txt",
    "step-0000000001/README",
    "attempt-0123456789ABCDEF/rank0-000000",
    "attempt-0123456789abcdef/rank0-00000",
    "attempt-0123456789abcdef/rank01-000000",
)


def plant(store: ObjectStore, keys: Mapping[str, bytes]) -> None:
    for key, data in keys.items():
        store.put(key, [data])


def missing_or_changed(store: ObjectStore, keys: Mapping[str, bytes]) -> list[str]:
    """The planted keys that are gone or hold other bytes (empty: all intact)."""
    return [k for k, data in keys.items() if store.head(k) is None or store.get(k) != data]
