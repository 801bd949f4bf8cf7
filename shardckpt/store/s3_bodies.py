"""Request and response bodies that never join or copy the caller's buffers: an upload
streams its byte views as they are (:class:`BufferChain`), a ranged GET reads from the socket
into the destination views (:func:`body_reader`)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from typing import Any

from shardckpt.store.retry import check_cancelled


def body_reader(body: Any) -> Callable[[memoryview], int]:
    """A ``readinto`` for a GET body that writes straight into the destination. urllib3's own
    ``readinto`` reads into a temporary and copies; http.client's underneath (used when the
    body is not content-encoded) reads from the socket into the view."""
    raw = body._raw_stream
    fp = getattr(raw, "_fp", None)
    if fp is not None and not raw.headers.get("content-encoding") and hasattr(fp, "readinto"):
        return fp.readinto
    return raw.readinto


class BufferChain(io.RawIOBase):
    """A seekable, read-only file over a sequence of byte views, for request bodies:
    botocore streams it without the buffers ever being joined. Once ``cancel`` is set,
    reading raises :class:`SaveAbortedError` naming ``uri``: the request stops mid-body."""

    def __init__(
        self,
        views: Sequence[memoryview],
        cancel: threading.Event | None = None,
        uri: str = "",
    ) -> None:
        self._cancel, self._uri = cancel, uri
        self._views = [v for v in views if len(v)]
        self._starts: list[int] = []
        pos = 0
        for v in self._views:
            self._starts.append(pos)
            pos += len(v)
        self._size = pos
        self._pos = 0
        self._index = 0

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(base + offset, 0), self._size)
        self._index = 0
        while self._index + 1 < len(self._views) and self._starts[self._index + 1] <= self._pos:
            self._index += 1
        return self._pos

    def read(self, size: int = -1) -> bytes | memoryview:  # type: ignore[override]
        check_cancelled(self._cancel, self._uri)
        if self._pos >= self._size:
            return b""
        while self._starts[self._index] + len(self._views[self._index]) <= self._pos:
            self._index += 1
        view = self._views[self._index]
        start = self._pos - self._starts[self._index]
        end = len(view) if size is None or size < 0 else min(len(view), start + size)
        self._pos += end - start
        # A view, not a copy: http.client sends it with sendall, which releases the GIL.
        return view[start:end]

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)
