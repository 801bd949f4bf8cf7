"""Retries with capped exponential backoff and full jitter, within a bounded budget."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from shardckpt.errors import RetriesExhaustedError

logger = logging.getLogger(__name__)
T = TypeVar("T")


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
    """

    max_attempts: int = 8
    base_delay: float = 0.1
    max_delay: float = 5.0
    deadline: float | None = 300.0

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
                logger.debug(
                    "%s: attempt %d failed (%s); retrying in %.2fs", what, attempt + 1, exc, delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable")
