"""Ctrl-C during a save, with real signals against a real S3 server (moto over HTTP).

A subprocess (``interrupted_save.py``) saves 256 MiB, through a ``Checkpointer``,
``shardckpt.save`` or the Lightning plugin (whose background saves are the Checkpointer's), to moto behind a proxy that lets uploads through at 32 MiB/s: the save
takes at least 8 s on any machine, so the signals land while the upload is in flight. The
first Ctrl-C must say that the save finishes and how to abort it; the second must end the
process within seconds with nothing committed and nothing that gc (grace 0) leaves behind.
The local store writes too fast to be interrupted reliably.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt import ShardWriter
from shardckpt._util.abort import AbortSwitch
from shardckpt.errors import SaveAbortedError, first_cause
from shardckpt.retention.garbage import collect_garbage
from shardckpt.store import open_store
from shardckpt.testing.servers import LocalS3Server
from tests.conftest import make_target
from tests.reliability.fault_proxy import FaultProxy, Rule, on

ROOT = Path(__file__).resolve().parents[2]
MIB = 256  # at the proxy's 32 MiB/s: 8 s at least


@pytest.fixture
def slow_link(moto: LocalS3Server) -> Iterator[FaultProxy]:
    """moto behind a 32 MiB/s link for uploads (every PUT body, parts included)."""
    with FaultProxy(moto.endpoint, [Rule("throttle", match=on(method="PUT"))]) as proxy:
        yield proxy


class Saver:
    """The subprocess, with its stderr read line by line on a thread (so waiting for one
    line can time out)."""

    def __init__(self, mode: str, uri: str, server: LocalS3Server, endpoint: str) -> None:
        env = {**os.environ, **server.env, "AWS_ENDPOINT_URL": endpoint}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.checkpointer.interrupted_save", mode, uri, str(MIB)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        assert self.proc.stderr is not None
        threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True).start()

    def _read(self, stream) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            self.stderr.append(line)
            if text in line:
                return
        self.proc.kill()
        pytest.fail(f"no {text!r} on stderr within {timeout}s:\n{''.join(self.stderr)}")

    def finish(self, timeout: float) -> str:
        """Wait for the exit; the rest of stderr."""
        self.proc.wait(timeout)
        time.sleep(0.2)  # the reader thread drains the pipe
        while not self.lines.empty():
            self.stderr.append(self.lines.get())
        return "".join(self.stderr)


def _start(mode: str, moto: LocalS3Server, proxy: FaultProxy) -> tuple[Saver, str]:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(bucket)
    uri = f"s3://{bucket}/run"
    saver = Saver(mode, uri, moto, proxy.endpoint)
    assert saver.proc.stdout is not None
    assert saver.proc.stdout.readline() == "saving\n"
    # Signal only once data is on the wire: before that (opening the store, planning) a
    # Ctrl-C has no upload to finish, and on a busy machine that can take over a second.
    deadline = time.monotonic() + 30
    while proxy.throttled_bytes < 1 << 20:
        assert time.monotonic() < deadline, "the upload did not start within 30 s"
        time.sleep(0.05)
    return saver, uri


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["checkpointer", "save", "lightning"])
def test_ctrl_c_twice_aborts_within_seconds_and_commits_nothing(
    moto: LocalS3Server, slow_link: FaultProxy, mode: str
) -> None:
    saver, uri = _start(mode, moto, slow_link)
    saver.proc.send_signal(signal.SIGINT)
    saver.wait_for("press Ctrl-C again to abort it", timeout=5)
    saver.proc.send_signal(signal.SIGINT)
    saver.wait_for("nothing was committed", timeout=4)
    stderr = saver.finish(timeout=15)  # the interpreter's teardown, slow on a busy machine
    # An uncaught KeyboardInterrupt ends Python by SIGINT: a shell reports exit code 130.
    assert saver.proc.returncode == -signal.SIGINT, stderr
    assert "SaveFailedError" not in stderr, stderr
    # The uploads stopped: they did not run on to the end through the slow link.
    assert slow_link.throttled_bytes < MIB << 20, slow_link.throttled_bytes
    store = open_store(uri, endpoint=moto.endpoint)
    assert not [o.key for o in store.list() if o.key.endswith("manifest.json")]
    collect_garbage(store, grace_s=0)
    assert list(store.list()) == [] and list(store.list_pending_uploads()) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["checkpointer", "save", "lightning"])
def test_ctrl_c_once_says_so_and_lets_the_save_finish(
    moto: LocalS3Server, slow_link: FaultProxy, mode: str
) -> None:
    saver, uri = _start(mode, moto, slow_link)
    saver.proc.send_signal(signal.SIGINT)
    saver.wait_for("Ctrl-C: finishing the save", timeout=5)
    stderr = saver.finish(timeout=60)
    assert saver.proc.returncode == -signal.SIGINT, stderr
    store = open_store(uri, endpoint=moto.endpoint)
    manifest = "step-0000000007/manifest.json" if mode == "checkpointer" else "manifest.json"
    assert store.head(manifest) is not None, stderr


@pytest.mark.parametrize("name", ["local", "moto-boto3", "moto-crt"])
def test_an_aborted_writer_uploads_nothing_and_never_commits(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target = make_target(name, request, tmp_path)
    writer = ShardWriter(target.uri, **target.options)
    writer.abort_switch.abort()
    with pytest.raises(CheckpointException) as info:
        dcp.save({"w": torch.ones(1 << 20)}, storage_writer=writer, no_dist=True)
    cause = first_cause(info.value)
    assert isinstance(cause, SaveAbortedError) and "its save was aborted" in str(cause)
    store = target.open()
    assert list(store.list()) == []
    # Too late once the commit has begun: the abort is refused, the commit goes on.
    switch = AbortSwitch()
    switch.begin_commit(store.uri("manifest.json"))
    assert switch.abort() is False
    with pytest.raises(SaveAbortedError, match="not committed"):
        aborted = AbortSwitch()
        aborted.abort()
        aborted.begin_commit(store.uri("manifest.json"))
