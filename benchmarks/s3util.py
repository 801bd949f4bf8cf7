"""The boto3 helpers the peers and the harness share: a client, byte views of a state,
cutting them into objects, and deleting a prefix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import boto3
import botocore.config
import torch

MiB = 1 << 20
REGION = "us-east-1"


@dataclass(frozen=True)
class Target:
    """Where a rank writes: the S3 ``endpoint`` and ``bucket``, its ``rank`` and
    ``world_size``, and ``scratch``, a local folder for systems that stage files."""

    endpoint: str
    bucket: str
    rank: int
    world_size: int
    scratch: str

    def client(self, threads: int = 8):  # type: ignore[no-untyped-def]  # botocore's client type is generated
        """A boto3 S3 client for ``endpoint`` with a connection per thread (checksums only
        where S3 requires them, as for shardckpt's own client)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                max_pool_connections=max(10, 2 * threads),
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def byte_views(state: dict[str, torch.Tensor]) -> list[memoryview]:
    """Writable byte views of the (contiguous CPU) tensors of ``state``, in key order."""
    return [memoryview(state[k].reshape(-1).view(torch.uint8).numpy()) for k in sorted(state)]


def cut(views: Sequence[memoryview], size: int) -> list[list[memoryview]]:
    """The concatenation of ``views`` cut into pieces of ``size`` bytes (the last may be
    shorter), each piece a list of views into the original memory."""
    pieces: list[list[memoryview]] = [[]]
    room = size
    for view in views:
        pos = 0
        while pos < len(view):
            if room == 0:
                pieces.append([])
                room = size
            take = min(room, len(view) - pos)
            pieces[-1].append(view[pos : pos + take])
            pos += take
            room -= take
    return [p for p in pieces if p]


def delete_prefix(client, bucket: str, prefix: str) -> int:  # type: ignore[no-untyped-def]
    """Delete every object under ``prefix``; return how many."""
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            count += len(keys)
    return count


def read_into(body, views: Sequence[memoryview]) -> None:  # type: ignore[no-untyped-def]
    """Fill ``views`` from a GetObject body, without intermediate copies."""
    raw = body._raw_stream  # urllib3 response: readinto straight into our memory
    try:
        for view in views:
            got = 0
            while got < len(view):
                n = raw.readinto(view[got:])
                if not n:
                    raise OSError(f"object ended {len(view) - got} bytes early")
                got += n
    finally:
        body.close()
