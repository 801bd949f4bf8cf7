"""Fixtures of the reliability suite: buckets on the session's moto server, fault proxies in
front of it, and a tally of requests, faults and kill points printed at the end of the run."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from shardckpt.store import ObjectStore, RetryPolicy, open_store
from shardckpt.testing.servers import LocalS3Server
from tests.reliability.fault_proxy import FaultProxy
from tests.reliability.workers import Zygote

# Fast retries so a test spends its time on faults, not on sleeping; enough attempts that a
# mix of ~25% faulty requests never exhausts them (0.25**10 per operation).
FAST_RETRY = RetryPolicy(max_attempts=10, base_delay=0.01, max_delay=0.2, deadline=60.0)
# A short read timeout keeps the proxy's stalls (1.5 s by default) cheap.
READ_TIMEOUT = 0.75

TALLY: Counter[str] = Counter()


def s3_options(endpoint: str, retry: RetryPolicy = FAST_RETRY, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "read_timeout": READ_TIMEOUT,
        "connect_timeout": 2.0,
        "retry": retry,
        **extra,
    }


@pytest.fixture
def bucket(moto: LocalS3Server) -> str:
    name = f"rel-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    return name


@pytest.fixture
def direct(moto: LocalS3Server, bucket: str) -> Iterator[ObjectStore]:
    """The bucket opened straight on moto, bypassing any proxy: what is really stored."""
    store = open_store(f"s3://{bucket}", endpoint=moto.endpoint)
    yield store
    store.close()


@pytest.fixture
def proxy(moto: LocalS3Server, request: pytest.FixtureRequest) -> Iterator[FaultProxy]:
    seed = int.from_bytes(request.node.nodeid.encode()[-4:], "big")  # per-test, reproducible
    with FaultProxy(moto.endpoint, seed=seed) as p:
        yield p
    TALLY["proxy requests"] += p.requests
    TALLY["injected faults"] += p.total_faults
    for kind, n in p.faults.items():
        TALLY[f"fault {kind}"] += n


@pytest.fixture(scope="session")
def zygote(moto: LocalS3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """The warm process that forks the workers of the crash and race tests (started after
    moto, so they inherit its credentials)."""
    z = Zygote(tmp_path_factory.mktemp("zygote") / "stderr.log")
    yield z
    z.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TALLY:
        terminalreporter.write_sep("-", "reliability tally")
        for key in sorted(TALLY):
            terminalreporter.write_line(f"{key}: {TALLY[key]}")
