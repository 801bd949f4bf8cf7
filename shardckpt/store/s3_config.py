"""Configuration of the S3 backend: one frozen dataclass with documented defaults.

Which transport, per endpoint, from measurements (``benchmarks/transport_bench.py``,
``benchmarks/store_bench.py``; details in ``s3_crt``):

- SeaweedFS (a Go server) on loopback: ``boto3``. Saves are bound by the server for
  both; boto3 loads 2x faster than the CRT (whose binding copies every part twice more)
  and costs a quarter of its CPU.
- moto: ``boto3``, 1.8x the CRT's PUT and 2.6x its GET throughput (``store_bench``, 8 x 16
  MiB); moto reads the whole object for every ranged GET, and the CRT splits each read into
  8 MiB ranged GETs.
- rclone's ``serve s3``: ``boto3`` only; it refuses the CRT's uploads.
- AWS S3 from an instance with a 25-100 Gbit/s NIC: try ``"crt"`` with
  ``throughput_target_gbps`` set to the NIC's bandwidth; that is what the CRT is made for and
  what we cannot measure here. Its load still beats s3torchconnector's DCP reader (1.8x on
  SeaweedFS), and its save matches it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from shardckpt.errors import InvalidURIError
from shardckpt.store.retry import RetryPolicy

MiB = 1 << 20
MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
MIN_PART = 5 * MiB  # S3's minimum size of every part but the last
_DEFAULT_PART_SIZE = {"boto3": 16 * MiB, "crt": 8 * MiB}


@dataclass(frozen=True)
class S3Config:
    """How to reach S3 and how hard to push it.

    - ``endpoint``: URL of a custom endpoint (MinIO, moto, rclone); default from
      ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, else AWS. Custom endpoints use
      path-style addressing.
    - ``region``: default from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``us-east-1``.
    - ``profile``: a named profile of ``~/.aws/credentials``; credentials otherwise come from
      the usual chain (environment, shared files, instance metadata).
    - ``transport``: ``"boto3"`` (default: fastest against every server we measured, and the
      only one with conditional puts) or ``"crt"`` (s3torchconnector's AWS CRT client, made
      for high-bandwidth links to AWS; conditional puts still go through boto3).
    - ``max_concurrency``: parallel requests for the parts of one object (boto3's threads).
    - ``multipart_threshold`` / ``part_size``: bytes; boto3 uploads objects above the
      threshold in parts of ``part_size``, grown as needed so no object needs more than
      10,000 parts. The CRT cuts every upload into parts of ``part_size`` and every read into
      ranged GETs of that size. Default (None): 16 MiB for boto3, 8 MiB for the CRT
      (s3torchconnector's default; 16 MiB made its reads 1.5-2x slower, see ``s3_crt``).
    - ``throughput_target_gbps``: the CRT's target in Gbit/s, from which it sizes its own
      connection pool and requests in flight (boto3 ignores it); default 10, as
      s3torchconnector's.
    - ``connect_timeout`` / ``read_timeout``: seconds per request.
    - ``unsafe_unconditional_commit``: commit on a server that ignores ``If-None-Match``
      (rclone's ``serve s3``), where two writers of one checkpoint can both "win" and the last
      silently replaces the other's manifest; logged as a WARNING. Default False: such a
      server is detected (a probe on the first conditional put to a bucket) and refused.
    """

    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    transport: str = "boto3"
    max_concurrency: int = 8
    multipart_threshold: int = 64 * MiB
    part_size: int | None = None
    throughput_target_gbps: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    unsafe_unconditional_commit: bool = False

    def __post_init__(self) -> None:
        if self.transport not in ("boto3", "crt"):
            raise ValueError(f"unknown S3 transport {self.transport!r}: use 'boto3' or 'crt'")
        if self.part_size is not None and self.part_size < MIN_PART:
            raise ValueError(
                f"part_size must be at least 5 MiB (S3's minimum), got {self.part_size}"
            )
        if not self.throughput_target_gbps > 0:
            raise ValueError(
                f"throughput_target_gbps must be positive, got {self.throughput_target_gbps}"
            )

    def resolved_endpoint(self) -> str | None:
        """The endpoint URL, checked: botocore would fail on one without a scheme with a
        bare ``ValueError``, and the CRT would try to resolve it as a host name."""
        for source, value in (
            ("endpoint", self.endpoint),
            ("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL_S3")),
            ("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL")),
        ):
            if value:
                _check_endpoint(value, source)
                return value
        return None

    def resolved_region(self) -> str:
        return (
            self.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )

    def resolved_part_size(self) -> int:
        """``part_size``, or the transport's default."""
        return self.part_size or _DEFAULT_PART_SIZE[self.transport]

    def part_size_for(self, size: int) -> int:
        """The part size for an object of ``size`` bytes: at least ``part_size``, and large
        enough (rounded up to a MiB) that the object needs at most 10,000 parts."""
        needed = -(-size // MAX_PARTS)
        needed = -(-needed // MiB) * MiB
        return max(self.resolved_part_size(), needed)


def _check_endpoint(url: str, source: str) -> None:
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.hostname:
        return
    if "://" not in url:
        raise InvalidURIError(
            f"S3 endpoint {url!r} (from {source}) has no scheme: use http://{url} or https://{url}"
        )
    raise InvalidURIError(
        f"S3 endpoint {url!r} (from {source}) is not an http:// or https:// URL with a host"
    )


def timeout_options(seconds: float) -> dict[str, Any]:
    """Store options under which one operation gives up after about ``seconds``, retries
    included (for interactive use: the defaults keep retrying an unanswering server for
    5 minutes). Each request may take a third of it, so a third attempt, the first logged
    at WARNING, still fits."""
    per_request = seconds / 3
    return {
        "retry": RetryPolicy(deadline=seconds),
        "read_timeout": per_request,
        "connect_timeout": min(S3Config.connect_timeout, per_request),
    }
