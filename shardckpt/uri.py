"""Parse checkpoint URIs: ``s3://bucket/prefix``, ``file:///abs/path`` and plain paths."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlparse

from shardckpt.errors import InvalidURIError

# S3 bucket naming rules (lowercase, digits, dots, hyphens; 3-63 chars).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Location:
    """Where a store lives. ``scheme`` is ``"s3"`` or ``"file"``.

    For S3, ``bucket`` is set and ``prefix`` is the key prefix without leading or
    trailing slashes. For files, ``prefix`` is an absolute directory path.
    """

    scheme: str
    prefix: str
    bucket: str = ""

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"file://{self.prefix}"

    def split(self) -> tuple[Location, str]:
        """The parent location and this one's last name ("" at a bucket or file root)."""
        if self.scheme == "s3":
            parent, _, name = self.prefix.rpartition("/")
            return Location("s3", parent, self.bucket), name
        return Location("file", os.path.dirname(self.prefix)), os.path.basename(self.prefix)

    def child(self, name: str) -> Location:
        """The location ``name`` levels below this one (``name`` may contain slashes)."""
        name = name.strip("/")
        if self.scheme == "s3":
            prefix = f"{self.prefix}/{name}" if self.prefix else name
            return Location("s3", prefix, self.bucket)
        return Location("file", os.path.join(self.prefix, name))


def parse_uri(uri: str | os.PathLike[str]) -> Location:
    """Parse ``uri`` into a :class:`Location`, or raise :class:`InvalidURIError`."""
    text = os.fspath(uri)
    if not isinstance(text, str) or not text:
        raise InvalidURIError(f"empty checkpoint URI: {uri!r}")
    if "://" not in text:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", text) and not os.path.exists(text):
            raise InvalidURIError(f"unknown URI scheme in {text!r}: use s3://, file:// or a path")
        return Location("file", os.path.abspath(text))
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        bucket = parsed.netloc
        if not bucket:
            raise InvalidURIError(f"no bucket in {text!r}: expected s3://bucket/prefix")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise InvalidURIError(f"invalid S3 bucket name {bucket!r} in {text!r}")
        prefix = parsed.path.strip("/")
        if any(part in (".", "..") for part in prefix.split("/")):
            raise InvalidURIError(f"'.' or '..' segments are not allowed in {text!r}")
        return Location("s3", prefix, bucket)
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidURIError(f"file URI with a host is not supported: {text!r}")
        if not parsed.path.startswith("/"):
            raise InvalidURIError(f"file URI must be absolute: {text!r}")
        return Location("file", os.path.normpath(parsed.path))
    raise InvalidURIError(
        f"unknown URI scheme {scheme!r} in {text!r}: use s3://, file:// or a path"
    )
