"""Bad input gets one clear error: the right exception type, naming the URI, never a secret."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from shardckpt.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConfigError,
    EndpointUnreachableError,
    InvalidURIError,
    ObjectNotFoundError,
    RetriesExhaustedError,
)
from shardckpt.store import ObjectStore, open_store
from shardckpt.store.s3_config import timeout_options
from shardckpt.testing.servers import LocalS3Server, start_moto
from shardckpt.uri import Location, parse_uri
from tests.store.silent_server import silent_server

if TYPE_CHECKING:
    from tests.conftest import Target

TRANSPORTS = ["boto3", "crt"]


def operations(store: ObjectStore, key: str = "some/key") -> dict[str, Callable[[], object]]:
    """One call of each kind that has to reach the server."""
    return {
        "put": lambda: store.put(key, [b"data"]),
        "get": lambda: store.get(key),
        "get_into": lambda: store.get_into(key, 0, [memoryview(bytearray(4))]),
        "list": lambda: list(store.list("some/")),
        "delete": lambda: store.delete([key]),
    }


# -- URIs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "gs://x/y",
        "ftp://host/path",
        "http://example.com/bucket/key",
        "hdfs://nn/ckpt",
        "gs:bucket/x",
    ],
)
def test_unknown_scheme(uri: str) -> None:
    with pytest.raises(InvalidURIError) as info:
        open_store(uri)
    assert uri in str(info.value)
    assert "s3://" in str(info.value)  # and says what would work


@pytest.mark.parametrize("uri", ["s3://", "s3:///prefix", "s3:///"])
def test_s3_without_bucket(uri: str) -> None:
    with pytest.raises(InvalidURIError, match="no bucket") as info:
        open_store(uri)
    assert uri in str(info.value)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://My_Bucket/x",
        "s3://UPPER/x",
        "s3://ab/x",
        "s3://b/x",
        f"s3://{'a' * 64}/x",
        "s3://a..b/x",
        "s3://-bucket/x",
        "s3://bucket-/x",
        "s3://bucket:9000/x",
        "s3://user@bucket/x",
    ],
)
def test_invalid_bucket_name(uri: str) -> None:
    with pytest.raises(InvalidURIError, match="bucket") as info:
        open_store(uri, endpoint="http://127.0.0.1:9")
    assert uri in str(info.value)


def test_valid_bucket_names_are_accepted() -> None:
    for bucket in ("abc", "a" * 63, "my-bucket.with.dots", "0123"):
        assert parse_uri(f"s3://{bucket}/x").bucket == bucket


def test_parse_s3() -> None:
    assert parse_uri("s3://bucket/a/b/") == Location("s3", "a/b", "bucket")
    assert parse_uri("s3://bucket") == Location("s3", "", "bucket")
    assert parse_uri("s3://bucket/") == Location("s3", "", "bucket")
    assert str(parse_uri("s3://bucket/a/b/")) == "s3://bucket/a/b"
    assert str(parse_uri("s3://bucket")) == "s3://bucket"
    assert parse_uri("S3://bucket/x").scheme == "s3"
    assert parse_uri("s3://bucket/run").child("step_10/") == Location("s3", "run/step_10", "bucket")
    assert parse_uri("s3://bucket").child("step_10") == Location("s3", "step_10", "bucket")


def test_parse_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_uri("file:///abs/dir") == Location("file", "/abs/dir")
    assert parse_uri("file://localhost/abs/dir") == Location("file", "/abs/dir")
    assert parse_uri("file:///abs/dir/../other/") == Location("file", "/abs/other")
    assert parse_uri("/abs/dir") == Location("file", "/abs/dir")
    assert parse_uri(tmp_path) == Location("file", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert parse_uri("relative/dir") == Location("file", str(tmp_path / "relative" / "dir"))
    assert parse_uri("ckpt") == Location("file", str(tmp_path / "ckpt"))
    assert str(parse_uri("file:///abs/dir")) == "file:///abs/dir"
    assert parse_uri("file:///abs").child("a/b") == Location("file", "/abs/a/b")
    # A local name that merely looks like a scheme is a path when it exists.
    (tmp_path / "c:odd").mkdir()
    assert parse_uri("c:odd") == Location("file", str(tmp_path / "c:odd"))


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("file://host/x", "host"),
        ("file://example.com/abs/x", "host"),
        ("s3://b/../x", "bucket"),  # (b is also too short)
        ("s3://bucket/../x", r"'\.\.'"),
        ("s3://bucket/a/../../x", r"'\.\.'"),
        ("s3://bucket/a/./b", r"'\.'"),
        ("", "empty"),
    ],
)
def test_parse_rejects(uri: str, match: str) -> None:
    with pytest.raises(InvalidURIError, match=match) as info:
        parse_uri(uri)
    assert repr(uri) in str(info.value)


def test_unknown_option_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="bogus_option"):
        open_store(tmp_path / "store", bogus_option=1)
    with pytest.raises(TypeError, match="bogus_option"):
        open_store("s3://bucket/x", endpoint="http://127.0.0.1:9", bogus_option=1)
    with pytest.raises(TypeError, match="multipart_treshold"):  # a typo is not a default
        open_store("s3://bucket/x", endpoint="http://127.0.0.1:9", multipart_treshold=1)


def test_unknown_transport() -> None:
    with pytest.raises(ValueError, match="carrier-pigeon"):
        open_store("s3://bucket/x", endpoint="http://127.0.0.1:9", transport="carrier-pigeon")


# -- missing things ------------------------------------------------------------------------


def test_missing_object(target: Target, store: ObjectStore) -> None:
    key = "no/such/object"
    for name, call in [
        ("get", lambda: store.get(key)),
        ("get_into", lambda: store.get_into(key, 0, [memoryview(bytearray(8))])),
    ]:
        with pytest.raises(ObjectNotFoundError) as info:
            call()
        assert store.uri(key) in str(info.value), f"{target.name} {name}: {info.value}"
        assert info.value.uri == store.uri(key)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bucket_does_not_exist(moto: LocalS3Server, transport: str) -> None:
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/ckpt"
    store = open_store(uri, endpoint=moto.endpoint, transport=transport)
    try:
        for name, call in operations(store).items():
            with pytest.raises(BucketNotFoundError) as info:
                call()
            assert uri in str(info.value), f"{transport} {name}: {info.value}"
        with pytest.raises(BucketNotFoundError):
            list(store.list_pending_uploads())
    finally:
        store.close()


def test_local_root_missing_is_not_an_error_until_read(tmp_path: Path) -> None:
    store = open_store(tmp_path / "not" / "yet")
    assert list(store.list()) == []
    assert store.head("x") is None
    with pytest.raises(ObjectNotFoundError):
        store.get("x")
    store.put("x", [b"1"])  # the root is created on the first put
    assert store.get("x") == b"1"


# -- unreachable endpoint ------------------------------------------------------------------


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unreachable_endpoint(closed_port: int, transport: str) -> None:
    uri = "s3://bucket/ckpt"
    store = open_store(uri, endpoint=f"http://127.0.0.1:{closed_port}", transport=transport)
    try:
        for name in ("put", "get"):
            start = time.monotonic()
            with pytest.raises(EndpointUnreachableError) as info:
                operations(store)[name]()
            elapsed = time.monotonic() - start
            assert uri in str(info.value), f"{transport} {name}: {info.value}"
            assert elapsed < 10, (
                f"{transport} {name} took {elapsed:.1f}s to give up on a closed port"
            )
    finally:
        store.close()


# -- wrong credentials ---------------------------------------------------------------------


@dataclass
class AuthServer:
    """A moto server that checks signatures, with one bucket, an IAM user allowed to use it
    (``good_key``/``good_secret``) and one allowed nothing (``weak_key``/``weak_secret``)."""

    server: LocalS3Server
    bucket: str
    good_key: str
    good_secret: str
    weak_key: str
    weak_secret: str


def _set_unauthenticated_requests(endpoint: str, count: float) -> None:
    """moto's ``/moto-api/reset-auth``: the next ``count`` requests skip authentication."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=str(count).encode(),
        headers={"Content-Type": "text/plain"},  # a form body would reach moto empty
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert json.load(reply)["status"] == "ok"


@pytest.fixture(scope="module")
def auth_moto() -> Iterator[AuthServer]:
    # INITIAL_NO_AUTH_ACTION_COUNT=0 makes moto authenticate every request (moto/settings.py,
    # moto/core/authorization.py); the server process reads it from its environment.
    previous = os.environ.get("INITIAL_NO_AUTH_ACTION_COUNT")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    try:
        server = start_moto()
    finally:
        if previous is None:
            del os.environ["INITIAL_NO_AUTH_ACTION_COUNT"]
        else:
            os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = previous
    with server:
        _set_unauthenticated_requests(server.endpoint, float("inf"))  # setup only
        setup = {"endpoint_url": server.endpoint, "region_name": "us-east-1"}
        setup |= {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        keys = {}
        for user in ("good", "weak"):
            iam.create_user(UserName=user)
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="good", PolicyName="s3", PolicyDocument=json.dumps(policy))
        boto3.client("s3", **setup).create_bucket(Bucket="guarded")
        _set_unauthenticated_requests(server.endpoint, 0)
        yield AuthServer(
            server,
            "guarded",
            keys["good"]["AccessKeyId"],
            keys["good"]["SecretAccessKey"],
            keys["weak"]["AccessKeyId"],
            keys["weak"]["SecretAccessKey"],
        )


def _use_credentials(monkeypatch: pytest.MonkeyPatch, key: str, secret: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_right_credentials_work(
    auth_moto: AuthServer, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """The control for the tests below: the server does accept a correct signature."""
    _use_credentials(monkeypatch, auth_moto.good_key, auth_moto.good_secret)
    store = open_store(
        f"s3://{auth_moto.bucket}/{transport}",
        endpoint=auth_moto.server.endpoint,
        transport=transport,
    )
    try:
        store.put("ok", [b"fine"])
        assert store.get("ok") == b"fine"
    finally:
        store.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", ["unknown key", "wrong secret", "no permission"])
def test_wrong_credentials(
    auth_moto: AuthServer, monkeypatch: pytest.MonkeyPatch, transport: str, case: str
) -> None:
    key, secret = {
        "unknown key": ("AKIAUNKNOWNUNKNOWN00", "unknown-secret-Zq8vK2pLx9"),
        "wrong secret": (auth_moto.good_key, "wrong-secret-Hf7dT3mWn5"),
        "no permission": (auth_moto.weak_key, auth_moto.weak_secret),
    }[case]
    _use_credentials(monkeypatch, key, secret)
    uri = f"s3://{auth_moto.bucket}/ckpt"
    store = open_store(uri, endpoint=auth_moto.server.endpoint, transport=transport)
    try:
        for name, call in operations(store).items():
            with pytest.raises(AccessDeniedError) as info:
                call()
            assert uri in str(info.value), f"{transport} {name}: {info.value}"
            # Neither the message nor anything chained to it may carry the secret.
            shown = "".join(traceback.format_exception(info.value)) + repr(info.value)
            assert secret not in shown, f"{transport} {name} leaks the secret key"
    finally:
        store.close()


# -- endpoints, profiles and servers that do not answer --------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_endpoint_without_scheme_is_an_invalid_uri(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(
        InvalidURIError, match=r"'127\.0\.0\.1:9000' \(from endpoint\) has no scheme"
    ):
        open_store("s3://bucket/ckpt", endpoint="127.0.0.1:9000", transport=transport)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:9000")
    with pytest.raises(InvalidURIError, match=r"'localhost:9000' \(from AWS_ENDPOINT_URL\)"):
        open_store("s3://bucket/ckpt", transport=transport)
    with pytest.raises(InvalidURIError, match="not an http:// or https:// URL"):
        open_store("s3://bucket/ckpt", endpoint="ftp://127.0.0.1:9000", transport=transport)


def test_https_to_a_plain_http_server_is_unreachable_at_once(moto: LocalS3Server) -> None:
    endpoint = moto.endpoint.replace("http://", "https://")
    uri = "s3://bucket/ckpt"
    store = open_store(uri, endpoint=endpoint)
    try:
        for name, call in operations(store).items():
            start = time.monotonic()
            with pytest.raises(EndpointUnreachableError) as info:
                call()
            message = str(info.value)
            assert uri in message and endpoint in message and "TLS handshake" in message, name
            assert time.monotonic() - start < 5, f"{name}: a failed handshake was retried"
    finally:
        store.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_unknown_profile_is_a_config_error(
    transport: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    options = {"endpoint": "http://127.0.0.1:9", "transport": transport}
    with pytest.raises(
        ConfigError, match=r"s3://bucket/ckpt: AWS profile 'nosuch' is not configured"
    ):
        open_store("s3://bucket/ckpt", profile="nosuch", **options)
    monkeypatch.setenv("AWS_PROFILE", "nosuch-either")
    with pytest.raises(ConfigError, match=r"'nosuch-either' \(from AWS_PROFILE\)"):
        open_store("s3://bucket/ckpt", **options)


def test_a_server_that_never_answers_is_given_up_within_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = "s3://bucket/ckpt"
    with silent_server() as endpoint:
        store = open_store(uri, endpoint=endpoint, **timeout_options(1.5))
        try:
            start = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="shardckpt"):
                with pytest.raises(RetriesExhaustedError, match=f"HEAD {uri}/manifest.json"):
                    store.head("manifest.json")
            assert time.monotonic() - start < 1.5 + 2
        finally:
            store.close()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned  # before the 3rd attempt
    assert f"HEAD {uri}/manifest.json: attempt 2 failed" in warned[0]
    assert "ReadTimeoutError" in warned[0] and "giving up after 1.5s" in warned[0]
