"""The store a DCP reader or writer works through, and the URI it stands for.

Either one it was given (shared, e.g. a Checkpointer's: never closed here) or one it opens
from its URI on first use and closes when it moves elsewhere. DCP may point a reader or
writer at another checkpoint (``reset(checkpoint_id)``) between uses.
"""

from __future__ import annotations

import os
from typing import Any

from shardckpt.store import ObjectStore, open_store
from shardckpt.uri import parse_uri


class StoreHandle:
    def __init__(
        self, uri: str | os.PathLike[str], store: ObjectStore | None, options: dict[str, Any]
    ) -> None:
        if store is not None and options:
            raise TypeError(f"store options {sorted(options)} given with an open store")
        parse_uri(uri)  # fail fast on a bad URI
        self.uri = os.fspath(uri)
        self.options = options
        self._store = store
        self._opened_here = False

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = open_store(self.uri, **self.options)
            self._opened_here = True
        return self._store

    def move(self, uri: str | os.PathLike[str] | None) -> None:
        """Stand for ``uri`` from now on (None, or the URI already held: no change)."""
        if uri is None or os.fspath(uri) == self.uri:
            return
        parse_uri(uri)
        self.uri = os.fspath(uri)
        self._let_go()

    def reroot(self, uri: str) -> None:
        """Work through the store rooted at ``uri`` (e.g. the checkpoint's parent) instead,
        still standing for the same checkpoint URI."""
        self._let_go()
        self._store = open_store(uri, **self.options)
        self._opened_here = True

    def _let_go(self) -> None:
        if self._opened_here and self._store is not None:
            self._store.close()
        self._store, self._opened_here = None, False


class OnStoreHandle:
    """The ``uri`` and ``store`` of a reader or writer: those of its :class:`StoreHandle`."""

    _handle: StoreHandle

    @property
    def uri(self) -> str:
        return self._handle.uri

    @property
    def store(self) -> ObjectStore:
        return self._handle.store
