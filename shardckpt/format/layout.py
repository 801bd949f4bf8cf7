"""Object keys of a checkpoint.

A checkpoint lives under a key prefix of a store::

    <checkpoint>/manifest.json                          the commit point, written last
    <checkpoint>/[<hash>/]<attempt>/rank<r>-<seq>        data, one stream of objects per rank

Every save attempt has a unique id, so no two writers (or a leftover writer of a crashed
run) can ever overwrite each other's data; the manifest names exactly its own objects.
With ``fanout`` > 0, data keys start with one of ``fanout`` hashed prefixes so S3 spreads
the request load over partitions; readers need no listing, the manifest records every key.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shardckpt.errors import ManifestError
from shardckpt.store.local import TMP_MARK

MANIFEST_NAME = "manifest.json"
ATTEMPT_MARK = "attempt-"
DCP_MARKER = ".metadata"  # DCP's own commit point (FileSystemWriter; what `mirror` uploads)

# The exact names this layout makes: the only ones a manifest may use, and so the only ones
# shardckpt may ever delete (deletion.py). A data object's name relative to its checkpoint
# (``data_name``; groups: rank, sequence number), a Checkpointer step's name
# (``catalog.step_name``, the only sibling a stream's home may be), and a temporary file of
# the local store (".<name>.tmp-shardckpt-<uuid4 hex>", store/local.py).
DATA_NAME = re.compile(
    rf"(?:[0-9a-f]{{3}}/)?{ATTEMPT_MARK}[0-9a-f]{{16}}/rank(0|[1-9][0-9]*)-([0-9]{{6}}|[1-9][0-9]{{6,}})"
)
STEP_NAME = re.compile(r"step-(?:[0-9]{10}|[1-9][0-9]{10,})")
_TEMP_NAME = re.compile(rf"(?:.*/)?\.[^/]+{re.escape(TMP_MARK)}[0-9a-f]{{32}}")


def is_own_key(key: str) -> bool:
    """Whether ``key`` is a name shardckpt's layout produces for a checkpoint at one of its
    prefixes (its manifest or a data object), whatever else is under it."""
    parts = key.split("/")
    return any(Layout("/".join(parts[:i])).owns(key) for i in range(len(parts)))


def is_temp_key(key: str) -> bool:
    """Whether ``key`` is a temporary file of the local store (an interrupted put)."""
    return _TEMP_NAME.fullmatch(key) is not None


def new_attempt_id() -> str:
    return f"{ATTEMPT_MARK}{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class Layout:
    """Keys of one checkpoint. ``prefix`` is the checkpoint's key prefix in its store
    ("" when the store is rooted at the checkpoint); ``fanout`` the number of hashed
    prefixes for data keys (0: none)."""

    prefix: str = ""
    fanout: int = 0

    def __post_init__(self) -> None:
        if self.fanout < 0 or self.fanout > 4096:
            raise ValueError(f"fanout must be in [0, 4096], got {self.fanout}")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def manifest_key(self) -> str:
        return self.key(MANIFEST_NAME)

    @property
    def data_prefix(self) -> str:
        """Prefix under which all data of this checkpoint lives (for listing and gc)."""
        return f"{self.prefix}/" if self.prefix else ""

    def data_name(self, attempt: str, rank: int, seq: int) -> str:
        """A data object's name relative to the checkpoint (what the manifest records, so a
        checkpoint stays valid wherever it is read or copied from)."""
        name = f"{attempt}/rank{rank}-{seq:06d}"
        if self.fanout:
            digest = hashlib.blake2b(name.encode(), digest_size=4).digest()
            name = f"{int.from_bytes(digest, 'big') % self.fanout:03x}/{name}"
        return name

    @property
    def name(self) -> str:
        """The checkpoint's name under its parent ("" when it is the root of its store)."""
        return self.prefix.rsplit("/", 1)[-1]

    def resolve(self, name: str, home: str = "") -> str:
        """The store key of ``name`` from a manifest, refusing a name this layout does not
        make (so nothing outside the checkpoint). With ``home``, ``name`` belongs to that
        sibling step (a stream an incremental save reuses)."""
        if not DATA_NAME.fullmatch(name):
            raise ValueError(f"object name {name!r} is not inside the checkpoint")
        if not home:
            return self.key(name)
        if not STEP_NAME.fullmatch(home) or home == self.name:
            raise ManifestError(f"stream home {home!r} is not the name of a sibling step")
        if not self.prefix:
            raise ManifestError(
                f"object {name!r} belongs to sibling checkpoint {home!r} (an incremental save), "
                "but this checkpoint is opened as the root of its store: give its parent (the "
                "Checkpointer's root) instead"
            )
        parent = self.prefix.rsplit("/", 1)[0] if "/" in self.prefix else ""
        return f"{parent}/{home}/{name}" if parent else f"{home}/{name}"

    def owns(self, key: str) -> bool:
        """Whether ``key`` is a name this checkpoint's layout produces: its manifest or one of
        its data objects (``[<hash>/]attempt-<16 hex>/rank<r>-<seq>``). Nothing else under its
        prefix (user files, look-alikes such as ``attempt-xyz/rank0-000000``) is shardckpt's."""
        name = key.removeprefix(self.data_prefix)
        if self.prefix and name == key:
            return False
        return name == MANIFEST_NAME or DATA_NAME.fullmatch(name) is not None

    def object_keys(self, streams: Iterable[Any]) -> list[str]:
        """The store keys of every object of ``streams`` (a manifest's StreamRecords)."""
        return [self.resolve(o.key, s.home) for s in streams for o in s.objects]
