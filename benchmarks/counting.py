"""A loopback TCP relay in front of an S3 endpoint that counts the requests passing through,
by S3 operation. Bytes are relayed untouched; only request heads are parsed (bodies are
skipped by ``Content-Length`` or chunked framing). It costs throughput, so the harness counts
in an untimed pass of its own."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from urllib.parse import parse_qs, urlsplit

_CHUNK = 1 << 20


def classify(method: str, target: str, headers: dict[str, str]) -> str:
    """The S3 operation of a path-style request, e.g. ``PutObject`` or ``GetObject(range)``."""
    parts = urlsplit(target)
    params = parse_qs(parts.query, keep_blank_values=True)
    has_key = "/" in parts.path.lstrip("/")
    if method == "PUT":
        if "partNumber" in params:
            return "UploadPart"
        if "x-amz-copy-source" in headers:
            return "CopyObject"
        return "PutObject" if has_key else "CreateBucket"
    if method == "POST":
        if "uploads" in params:
            return "CreateMultipartUpload"
        if "uploadId" in params:
            return "CompleteMultipartUpload"
        return "DeleteObjects" if "delete" in params else "POST"
    if method == "GET":
        if not has_key:
            return "ListMultipartUploads" if "uploads" in params else "ListObjects"
        return "GetObject(range)" if "range" in headers else "GetObject"
    if method == "HEAD":
        return "HeadObject" if has_key else "HeadBucket"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in params else "DeleteObject"
    return method


class RequestCounter:
    """Relay ``127.0.0.1:<free port>`` to ``upstream`` (``http://127.0.0.1:PORT``), counting.

    ``start()`` returns the relay's endpoint; ``snapshot()`` the counts so far."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
            raise ValueError(f"the counting relay only fronts loopback endpoints, not {upstream}")
        self._upstream = (parts.hostname, parts.port)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="request-counter", daemon=True
        )
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()  # the open client connections

    def start(self) -> str:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_CHUNK), self._loop
        )
        self._server = future.result(10)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    def stop(self) -> None:
        """Close the relay and its loop. Clients keep pooled connections open (s3fs), so
        relays are still running: each is ended here by closing its client's connection, or
        the garbage collector would later run their cleanup on a closed loop ("Event loop
        is closed")."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        relays = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for client in self._clients:
            client.close()  # its relay reads the end of the stream and finishes
        await asyncio.gather(*relays, return_exceptions=True)
        await asyncio.sleep(0)  # the closed connections' last callbacks run
        if self._server is not None:
            await self._server.wait_closed()

    # -- the relay --------------------------------------------------------------------------
    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        self._clients.add(client_out)
        upstream_in, upstream_out = await asyncio.open_connection(*self._upstream, limit=_CHUNK)
        back = asyncio.create_task(_pipe(upstream_in, client_out))
        try:
            while True:
                head = await client_in.readuntil(b"\r\n\r\n")
                headers = self._count(head)
                upstream_out.write(head)
                await _relay_body(headers, client_in, upstream_out)
                await upstream_out.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client left (or ``stop`` closed its connection)
        finally:
            upstream_out.close()
            await asyncio.gather(back, return_exceptions=True)
            client_out.close()
            self._clients.discard(client_out)

    def _count(self, head: bytes) -> dict[str, str]:
        lines = head.decode("latin-1").split("\r\n")
        method, target, *_ = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        with self._lock:
            self._counts[classify(method, target, headers)] += 1
        return headers


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass
    finally:
        sink.close()


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter, length: int) -> None:
    while length > 0:
        data = await source.read(min(length, _CHUNK))
        if not data:
            raise ConnectionError("client closed inside a request body")
        sink.write(data)
        await sink.drain()
        length -= len(data)


async def _relay_body(
    headers: dict[str, str], source: asyncio.StreamReader, sink: asyncio.StreamWriter
) -> None:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await source.readuntil(b"\r\n")
            sink.write(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := await source.readuntil(b"\r\n")) != b"\r\n":
                    sink.write(trailer)
                sink.write(b"\r\n")
                return
            await _copy(source, sink, size + 2)
    await _copy(source, sink, int(headers.get("content-length", "0") or 0))
