"""RetryPolicy: what is retried, how often, for how long, and what the final error says.

Pure unit tests: the functions under retry are plain callables that fail on cue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest

from shardckpt.errors import ObjectNotFoundError, RetriesExhaustedError
from shardckpt.store.retry import RetryPolicy, TransientError

FAST = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.002, deadline=None)


def failing(
    times: int, error: Exception, result: str = "done"
) -> tuple[Callable[[], str], list[float]]:
    """A callable that raises ``error`` on its first ``times`` calls, then returns ``result``;
    and the list of the times it was called."""
    calls: list[float] = []

    def fn() -> str:
        calls.append(time.monotonic())
        if len(calls) <= times:
            raise error
        return result

    return fn, calls


def test_success_needs_no_retry() -> None:
    fn, calls = failing(0, TransientError("unused"))
    assert FAST.run("PUT s3://b/k", fn) == "done"
    assert len(calls) == 1


def test_transient_errors_are_retried_until_success() -> None:
    fn, calls = failing(3, TransientError("SlowDown (HTTP 503)", throttled=True))
    seen: list[TransientError] = []
    assert FAST.run("PUT s3://b/k", fn, on_retry=seen.append) == "done"
    assert len(calls) == 4  # max_attempts counts the first try
    assert len(seen) == 3 and all(e.throttled for e in seen)


def test_gives_up_after_max_attempts_naming_the_operation() -> None:
    fn, calls = failing(100, TransientError("connection reset"))
    with pytest.raises(RetriesExhaustedError) as info:
        FAST.run("UploadPart 7 s3://bucket/ckpt/shard", fn)
    assert len(calls) == FAST.max_attempts
    message = str(info.value)
    assert "UploadPart 7 s3://bucket/ckpt/shard" in message
    assert "4 attempts" in message and "connection reset" in message
    assert isinstance(info.value.__cause__, TransientError)


def test_one_attempt_means_no_retry() -> None:
    fn, calls = failing(100, TransientError("boom"))
    with pytest.raises(RetriesExhaustedError, match="1 attempts"):
        RetryPolicy(max_attempts=1, deadline=None).run("GET s3://b/k", fn)
    assert len(calls) == 1


def test_non_transient_errors_propagate_at_once() -> None:
    for error in (
        ObjectNotFoundError("s3://b/k does not exist", "s3://b/k"),
        ValueError("bad"),
        KeyError("k"),
    ):
        fn, calls = failing(100, error)
        retried: list[TransientError] = []
        with pytest.raises(type(error)) as info:
            FAST.run("GET s3://b/k", fn, on_retry=retried.append)
        assert info.value is error  # not wrapped
        assert len(calls) == 1 and retried == []


def test_respects_the_deadline() -> None:
    # Without the deadline this would make 200 attempts, sleeping ~10 ms before each: ~2 s.
    policy = RetryPolicy(max_attempts=200, base_delay=0.02, max_delay=0.02, deadline=0.3)
    fn, calls = failing(10**9, TransientError("stalled"))
    start = time.monotonic()
    with pytest.raises(RetriesExhaustedError, match="GET s3://b/slow") as info:
        policy.run("GET s3://b/slow", fn)
    elapsed = time.monotonic() - start
    assert len(calls) < 200 and f"after {len(calls)} attempts" in str(info.value)
    # It stops before a sleep would cross the deadline (slack for a loaded machine)...
    assert elapsed <= 0.3 + 0.5, f"ran {elapsed:.2f}s past a 0.3s deadline"
    # ...and it does use the time it has.
    assert elapsed >= 0.1 and len(calls) >= 3
    assert "stalled" in str(info.value)


def test_zero_deadline_means_a_single_attempt_that_is_not_retried() -> None:
    fn, calls = failing(100, TransientError("boom"))
    with pytest.raises(RetriesExhaustedError):
        RetryPolicy(max_attempts=8, base_delay=0.01, deadline=0.0).run("PUT s3://b/k", fn)
    assert len(calls) == 1


def test_backoff_grows_and_is_capped() -> None:
    # Delays are uniform in [0, min(max_delay, base_delay * 2**n)]: with a 10 ms cap, 4 retries
    # sleep at most 40 ms in all, where an uncapped 1 s base would sleep 7.5 s on average.
    capped = RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=0.01, deadline=None)
    fn, calls = failing(4, TransientError("busy"))
    start = time.monotonic()
    assert capped.run("PUT s3://b/k", fn) == "done"
    assert time.monotonic() - start < 1.0
    assert len(calls) == 5

    # Uncapped, the bound doubles each time: 4 retries sleep 5+10+20+40 = 75 ms on average;
    # a constant 10 ms bound would average 20 ms.
    growing = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=10.0, deadline=None)
    totals = []
    for _ in range(10):
        fn, calls = failing(4, TransientError("busy"))
        start = time.monotonic()
        growing.run("PUT s3://b/k", fn)
        totals.append(time.monotonic() - start)
    assert sum(totals) / len(totals) > 0.04
    assert min(totals) < 0.15 + 0.5  # the bound is 150 ms (slack for a loaded machine)


def test_policy_is_a_frozen_value() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_attempts = 3  # type: ignore[misc]
    assert RetryPolicy(max_attempts=3) == RetryPolicy(max_attempts=3)


def test_retries_are_warned_from_the_third_attempt_on(caplog: pytest.LogCaptureFixture) -> None:
    fn, calls = failing(3, TransientError("SlowDown (HTTP 503)", throttled=True))
    with caplog.at_level(logging.DEBUG, logger="shardckpt.store.retry"):
        assert FAST.run("PUT s3://b/k", fn) == "done"
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    # Attempt 1 failing is routine (DEBUG); announcing attempts 3 and 4 is not.
    assert [r.levelno for r in retries] == [logging.DEBUG, logging.WARNING, logging.WARNING]
    assert all(
        "PUT s3://b/k" in r.getMessage() and "SlowDown (HTTP 503)" in r.getMessage()
        for r in retries
    )
