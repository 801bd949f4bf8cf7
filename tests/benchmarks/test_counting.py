"""The counting relay: it counts requests by S3 operation, and ``stop`` shuts it down cleanly
even while a client (s3fs, aiohttp's pool) keeps its connections open: nothing is left for
the garbage collector to finalize on a closed event loop ("Event loop is closed")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from benchmarks.counting import classify

ROOT = __file__.rsplit("/tests/", 1)[0]

# An upstream that keeps connections alive, a client that leaves its connection open, then
# stop, and the process's end (when leftovers were finalized and printed their errors).
_SCRIPT = textwrap.dedent(
    """
    import gc, http.client, http.server, threading
    from benchmarks.counting import RequestCounter

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        def log_message(self, *args):
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    counter = RequestCounter(f"http://127.0.0.1:{upstream.server_address[1]}")
    port = int(counter.start().rsplit(":", 1)[1])
    client = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(2):
        client.request("GET", "/bucket/key")
        assert client.getresponse().read() == b"ok"
    counter.stop()
    client.close()
    assert dict(counter.snapshot()) == {"GetObject": 2}, counter.snapshot()
    del counter
    gc.collect()
    print("stopped")
    """
)


def test_stop_with_a_connection_left_open_is_quiet() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", _SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "stopped", done.stderr[-3000:]
    assert done.stderr == "", done.stderr[-3000:]


def test_classify() -> None:
    assert classify("GET", "/b/k", {"range": "bytes=0-9"}) == "GetObject(range)"
    assert classify("PUT", "/b/k?partNumber=1&uploadId=x", {}) == "UploadPart"
    assert classify("GET", "/b?list-type=2&prefix=p", {}) == "ListObjects"
