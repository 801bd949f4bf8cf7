"""A fault-injecting HTTP proxy on 127.0.0.1, in front of a real S3 server (moto).

Clients are pointed at ``proxy.endpoint`` instead of the server: every request goes through
the proxy, which either forwards it unchanged or injects one fault, chosen by ordered
:class:`Rule` s and a seeded random generator:

- ``slowdown``: ``503 SlowDown`` with S3's XML error body (the request is not forwarded).
- ``internal``: ``500 InternalError`` with S3's XML error body (not forwarded).
- ``reset``: the connection is reset (RST) without a reply (not forwarded).
- ``reset_body``: the connection is reset halfway through reading the request body.
- ``stall``: no reply for ``stall_s`` seconds (longer than the client's read timeout), then
  the connection is closed (not forwarded).
- ``truncate``: forwarded; the reply's headers announce the full body, but only half of it
  is sent before the connection is closed.
- ``drop_reply``: forwarded (the server applies it), then the connection is reset instead
  of replying: the client cannot know its request succeeded.
- ``error_200``: ``200 OK`` whose body is an S3 ``<Error>`` (what S3 may answer to
  CompleteMultipartUpload); not forwarded.
- ``throttle``: forwarded, but its body is read at most at ``throttle_bps``, a rate shared by
  all throttled requests: a slow link, so an upload lasts long enough, on any machine, for a
  test to act while it is in flight.

Requests and injected faults are counted. Nothing here knows about shardckpt.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = (
    "slowdown",
    "internal",
    "reset",
    "reset_body",
    "stall",
    "truncate",
    "drop_reply",
    "error_200",
    "throttle",
)
# Faults after which the request has reached the server.
FORWARDED = ("truncate", "drop_reply", "throttle")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "transfer-encoding",
}


@dataclass(frozen=True)
class Request:
    """What a rule can match on: ``path`` includes the query string (``/bucket/key?uploads``)."""

    method: str
    path: str

    @property
    def query(self) -> str:
        return self.path.partition("?")[2]

    @property
    def is_complete_multipart(self) -> bool:
        return self.method == "POST" and "uploadId=" in self.query

    @property
    def is_upload_part(self) -> bool:
        return self.method == "PUT" and "partNumber=" in self.query


def on(
    method: str | None = None, path: str | None = None, query: str | None = None
) -> Callable[[Request], bool]:
    """A predicate: ``method`` equal, ``path`` a substring of the key part, ``query`` of the query."""

    def match(req: Request) -> bool:
        return (
            (method is None or req.method == method)
            and (path is None or path in req.path.partition("?")[0])
            and (query is None or query in req.query)
        )

    return match


def _always(req: Request) -> bool:
    return True


@dataclass
class Rule:
    """Inject ``kind`` into a share ``rate`` of the requests matching ``match``.

    ``limit``: at most this many injections (None: no limit). ``armed_by``: the rule is off
    until a request matching it has been forwarded unharmed; from then on it is on for
    ``duration`` seconds (None: for good) - an outage that starts mid-operation.
    """

    kind: str
    rate: float = 1.0
    match: Callable[[Request], bool] = _always
    limit: int | None = None
    armed_by: Callable[[Request], bool] | None = None
    duration: float | None = None
    injected: int = 0
    armed_at: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise ValueError(f"unknown fault {self.kind!r}; known: {FAULTS}")

    def active(self, now: float) -> bool:
        if self.limit is not None and self.injected >= self.limit:
            return False
        if self.armed_by is None and self.duration is None:
            return True
        if self.armed_at is None:
            return False
        return self.duration is None or now < self.armed_at + self.duration

    def arm(self, now: float) -> None:
        """Switch on a rule without ``armed_by`` (an outage starting now)."""
        self.armed_at = now


def _error_xml(code: str, message: str, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource.partition('?')[0]}</Resource>"
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
    ).encode()


class FaultProxy:
    """Forward HTTP from ``endpoint`` to ``upstream`` with faults. Use as a context manager.

    ``rules`` are tried in order; the first active, matching rule whose coin (``rate``)
    comes up decides the request's fault. ``stall_s``: how long a stall lasts;
    ``throttle_bps``: the bytes per second all throttled request bodies share.
    """

    def __init__(
        self,
        upstream: str,
        rules: list[Rule] | None = None,
        *,
        seed: int = 0,
        stall_s: float = 1.5,
        throttle_bps: float = 32 << 20,
    ) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.stall_s = stall_s
        self.throttle_bps = throttle_bps
        self._next_slot = 0.0  # when the shared link is free again (time.monotonic)
        self.throttled_bytes = 0  # request body bytes read through the throttled link
        self._rules = list(rules or [])
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = 0
        self.forwarded = 0
        self.faults: Counter[str] = Counter()
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, fault)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())

    def set_rules(self, rules: list[Rule]) -> None:
        with self._lock:
            self._rules = list(rules)

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def requests_matching(
        self, match: Callable[[Request], bool]
    ) -> Iterator[tuple[str, str, str | None]]:
        with self._lock:
            entries = list(self.log)
        return (e for e in entries if match(Request(e[0], e[1])))

    # -- called by the handler threads ----------------------------------------------------
    def _decide(self, req: Request) -> str | None:
        now = time.monotonic()
        with self._lock:
            self.requests += 1
            fault = None
            for rule in self._rules:
                if rule.active(now) and rule.match(req) and self._random.random() < rule.rate:
                    rule.injected += 1
                    fault = rule.kind
                    break
            if fault is not None:
                self.faults[fault] += 1
            self.log.append((req.method, req.path, fault))
            return fault

    def _pace(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit through the shared throttled link."""
        with self._lock:
            start = max(self._next_slot, time.monotonic())
            self._next_slot = start + nbytes / self.throttle_bps
            self.throttled_bytes += nbytes
            wait = self._next_slot - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def _forwarded_unharmed(self, req: Request) -> None:
        now = time.monotonic()
        with self._lock:
            self.forwarded += 1
            for rule in self._rules:
                if rule.armed_by is not None and rule.armed_at is None and rule.armed_by(req):
                    rule.armed_at = now


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.proxy = proxy
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy
    timeout = 30  # an idle keep-alive connection ends after this many seconds
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    # -- faults ---------------------------------------------------------------------------
    def _reset(self) -> None:
        """Drop the connection with a TCP RST: the client gets no (further) reply."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _reply(
        self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.send_response_only(status)
        for name, value in headers or [("Content-Type", "application/xml")]:
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    # -- the request ----------------------------------------------------------------------
    def _read_body(self, limit: int | None = None, *, paced: bool = False) -> bytes | None:
        """The raw request body (chunked bodies are kept as sent); with ``limit``, stop after
        that many bytes; ``paced``: at the proxy's throttled rate. None if the client went away."""
        try:
            length = self.headers.get("Content-Length")
            if length is not None:
                n = int(length) if limit is None else min(int(length), limit)
                if not paced:
                    return self.rfile.read(n)
                body = bytearray()
                while len(body) < n:
                    chunk = self.rfile.read(min(n - len(body), 256 << 10))
                    if not chunk:
                        return None
                    body += chunk
                    self.proxy._pace(len(chunk))
                return bytes(body)
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raw = bytearray()
                while limit is None or len(raw) < limit:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    raw += self.rfile.read(size + 2)
                    if size == 0:
                        break
                return bytes(raw)
            return b""
        except (OSError, ValueError):
            return None

    def _handle(self) -> None:
        proxy = self.proxy
        req = Request(self.command, self.path)
        fault = proxy._decide(req)
        if fault == "reset_body":
            length = int(self.headers.get("Content-Length") or 0)
            self._read_body(limit=length // 2)
            self._reset()
            return
        body = self._read_body(paced=fault == "throttle")
        if body is None:
            self.close_connection = True
            return
        if fault == "reset":
            self._reset()
        elif fault == "stall":
            time.sleep(proxy.stall_s)
            self._reset()
        elif fault == "slowdown":
            self._reply(503, _error_xml("SlowDown", "Please reduce your request rate.", req.path))
        elif fault == "internal":
            self._reply(
                500,
                _error_xml(
                    "InternalError", "We encountered an internal error. Please try again.", req.path
                ),
            )
        elif fault == "error_200":
            self._reply(
                200,
                _error_xml(
                    "InternalError", "We encountered an internal error. Please try again.", req.path
                ),
            )
        else:
            self._forward(req, body, fault)

    def _forward(self, req: Request, body: bytes, fault: str | None) -> None:
        try:
            status, reason, headers, data = self._upstream_call(body)
        except (OSError, http.client.HTTPException) as exc:
            self._reply(502, _error_xml("BadGateway", f"upstream failed: {exc}", req.path))
            return
        if fault == "drop_reply" or (fault == "truncate" and not data):
            self._reset()
            return
        if fault in (None, "throttle"):
            self.proxy._forwarded_unharmed(req)
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and (
                name.lower() != "content-length" or self.command == "HEAD"
            ):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        self.wfile.write(data)
        self.wfile.flush()

    def _upstream_call(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        for attempt in range(2):  # a kept-alive upstream connection may have been closed
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
            conn = self._upstream
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    lower = name.lower()
                    if lower not in _HOP_BY_HOP or (
                        lower == "transfer-encoding" and "chunked" in value.lower()
                    ):
                        conn.putheader(name, value)
                conn.endheaders(body if body else None)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    conn.close()
                    self._upstream = None
                return resp.status, resp.reason, resp.getheaders(), data
            except (OSError, http.client.HTTPException):
                conn.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        if self._upstream is not None:
            self._upstream.close()
