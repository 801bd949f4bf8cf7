"""Running the ``shardckpt`` command as a person does: a separate process, its output piped, or
its stderr on a terminal (a pseudo-terminal with a window size, as a real one has)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass

from tests.conftest import Target

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300


@dataclass(frozen=True)
class Done:
    code: int
    out: str
    err: str


def _env() -> dict[str, str]:
    # This checkout's shardckpt, whatever the working directory.
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def run_python(*args: str, cwd: str | None = None) -> Done:
    """``python ARGS`` with this checkout importable, stdout and stderr piped."""
    command = [sys.executable, *args]
    done = subprocess.run(
        command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    return Done(done.returncode, done.stdout, done.stderr)


def shardckpt(*args: str, cwd: str | None = None) -> Done:
    """``shardckpt ARGS`` with stdout and stderr piped."""
    return run_python("-m", "shardckpt.cli.main", *args, cwd=cwd)


def shardckpt_on_a_terminal(*args: str) -> Done:
    """``shardckpt ARGS`` with stderr on a terminal (stdout piped)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    command = [sys.executable, "-m", "shardckpt.cli.main", *args]
    proc = subprocess.Popen(
        command, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the process closed its end of the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        code = proc.wait(timeout=TIMEOUT_S)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return Done(code, out, b"".join(chunks).decode(errors="replace"))


def endpoint_args(target: Target) -> list[str]:
    """The command-line options that reach ``target``'s store (none for the local store)."""
    endpoint = target.options.get("endpoint")
    return ["--endpoint", str(endpoint)] if endpoint else []
