"""Timing one call and taking the peak resident memory of the process during it."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Sample:
    """One rank's figures for one call: wall ``seconds`` from call to return; ``rss_before``
    and ``peak_rss`` in bytes (the process's resident memory before the call and its high-water
    mark during it); ``phases``: named sub-timings the system reported, in seconds."""

    seconds: float
    rss_before: int
    peak_rss: int
    phases: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _status_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark of this process (Linux >= 4.0),
    which also resets ``getrusage``'s ``ru_maxrss``. False where that is not possible: the
    peak is then the process's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    return _status_bytes("VmRSS") or 0


def peak_rss() -> int:
    """The high-water mark of resident memory since the last reset, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(call: Callable[[], dict[str, float] | None]) -> Sample:
    """Run ``call`` and return its :class:`Sample`."""
    before = current_rss()
    reset_peak_rss()
    started = time.perf_counter()
    phases = call() or {}
    seconds = time.perf_counter() - started
    return Sample(seconds, before, peak_rss(), dict(phases))


def blocked_and_done(
    start: Callable[[], T], finish: Callable[[T], Any] = lambda _: None
) -> tuple[float, float]:
    """Seconds until ``start()`` returns (what its caller is blocked) and until ``finish`` of
    its result returns (for an asynchronous save: until it is committed)."""
    began = time.perf_counter()
    pending = start()
    blocked = time.perf_counter() - began
    finish(pending)
    return blocked, time.perf_counter() - began
