"""Retries with capped exponential backoff and full jitter, within a bounded budget; and the
cancellation of a save's requests in flight.

A retry is logged at DEBUG while it is routine and at WARNING from ``warn_after`` failed
attempts of one operation on, naming the operation, URI and cause: a server that stopped
answering shows within seconds instead of after the whole deadline.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from shardckpt.errors import RetriesExhaustedError, SaveAbortedError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The event that aborts the save the current thread uploads for (see ``cancelled_by``). A
# context variable, not a store attribute: one store serves many saves and loads.
_CANCEL: ContextVar[threading.Event | None] = ContextVar("shardckpt_cancel", default=None)


class TransientError(Exception):
    """Raised by a backend for a failure worth retrying (throttling, 5xx, reset, stall)."""

    def __init__(self, message: str, *, throttled: bool = False) -> None:
        super().__init__(message)
        self.throttled = throttled


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried.

    ``max_attempts`` counts the first try; ``base_delay`` and ``max_delay`` are seconds;
    the delay before attempt n+1 is uniform in [0, min(max_delay, base_delay * 2**n)].
    ``deadline`` (seconds, None for none) bounds the total time spent on one operation.
    ``warn_after``: failed attempts of one operation after which each retry is logged at
    WARNING (earlier ones at DEBUG); default 2, so the 3rd attempt is the first announced.
    """

    max_attempts: int = 8
    base_delay: float = 0.1
    max_delay: float = 5.0
    deadline: float | None = 300.0
    warn_after: int = 2

    def run(
        self,
        what: str,
        fn: Callable[[], T],
        on_retry: Callable[[TransientError], None] | None = None,
    ) -> T:
        """Call ``fn`` until it returns or raises a non-transient error.

        ``what`` names the operation and object for the final error message.
        """
        start = time.monotonic()
        for attempt in range(self.max_attempts):
            try:
                return fn()
            except TransientError as exc:
                if on_retry is not None:
                    on_retry(exc)
                delay = random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))
                elapsed = time.monotonic() - start
                last = attempt + 1 == self.max_attempts
                if last or (self.deadline is not None and elapsed + delay > self.deadline):
                    raise RetriesExhaustedError(
                        f"{what}: gave up after {attempt + 1} attempts in {elapsed:.1f}s: {exc}"
                    ) from exc
                logger.log(
                    logging.WARNING if attempt + 1 >= self.warn_after else logging.DEBUG,
                    "%s: attempt %d failed after %.1fs (%s); retrying in %.1fs%s",
                    what,
                    attempt + 1,
                    elapsed,
                    exc,
                    delay,
                    "" if self.deadline is None else f" (giving up after {self.deadline:g}s)",
                )
                time.sleep(delay)
        raise AssertionError("unreachable")


@contextmanager
def cancelled_by(event: threading.Event) -> Iterator[None]:
    """Within the block, request bodies the current thread sends stop as soon as ``event``
    is set, raising :class:`SaveAbortedError`: an aborted save must not wait for the
    gigabytes it has in flight. Backends read the event with :func:`cancel_event` in the
    calling thread (and hand it to their part threads)."""
    token = _CANCEL.set(event)
    try:
        yield
    finally:
        _CANCEL.reset(token)


def cancel_event() -> threading.Event | None:
    """The event of the enclosing :func:`cancelled_by` block, if any."""
    return _CANCEL.get()


def check_cancelled(event: threading.Event | None, uri: str) -> None:
    """Raise :class:`SaveAbortedError` naming ``uri`` if ``event`` is set."""
    if event is not None and event.is_set():
        raise SaveAbortedError(f"{uri}: upload cut short: its save was aborted")
