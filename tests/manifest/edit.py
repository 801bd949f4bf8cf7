"""Editing a stored manifest as a forger or a buggy writer would: the edit is re-sealed with
a fresh checksum, so what is tested is the field checks, not the checksum."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from shardckpt.format.manifest import SEAL_FIELD, seal
from shardckpt.store import ObjectStore


def unsealed(data: bytes) -> dict[str, Any]:
    """A manifest's document without its checksum."""
    doc = json.loads(data)
    doc.pop(SEAL_FIELD, None)
    return doc


def sealed(doc: dict[str, Any]) -> bytes:
    return seal(json.dumps(doc, separators=(",", ":")).encode())


def rewrite_manifest(store: ObjectStore, key: str, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Store ``edit(doc)`` (or ``doc``, edited in place, if it returns None), re-sealed."""
    doc = unsealed(store.get(key))
    new = edit(doc)
    store.put(key, [sealed(doc if new is None else new)])
