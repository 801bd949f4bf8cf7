"""A load's GETs: the items' byte ranges of each object coalesced into few requests, and
the countdown that tells which GET completes an item (so its check runs on that thread while
the other GETs go on). ``D`` is the reader's per-item destination."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Generic, TypeVar

from shardckpt._util.bytes import empty_bytes

D = TypeVar("D")

# Ranges of one object closer than this are fetched as one GET (the gap is read and dropped).
COALESCE_GAP = 1 << 20


@dataclass
class Request(Generic[D]):
    """One ranged GET: ``views`` filled from ``offset`` of ``key``; ``fills``: the items
    whose bytes (some or all) it brings."""

    key: str
    offset: int
    views: list[memoryview]
    fills: list[D]


class Countdown(Generic[D]):
    """How many GETs each item still waits for (an item may span two objects), so the
    thread whose GET completes an item checks it while the other GETs run."""

    def __init__(self, fills: list[D]) -> None:
        self._left = Counter(id(d) for d in fills)
        self._lock = threading.Lock()

    def waits_for(self, dest: D) -> bool:
        return id(dest) in self._left

    def done(self, fills: list[D]) -> list[D]:
        """Count one GET bringing bytes of ``fills``; return the items it completed."""
        with self._lock:
            self._left.subtract(id(d) for d in fills)
            return [d for d in fills if self._left[id(d)] == 0]


def coalesce(key: str, ranges: list[tuple[int, memoryview, D]]) -> list[Request[D]]:
    """Turn (offset, view, item) ranges of one object (disjoint: the manifest's checks
    refuse items that overlap partly, and the same bytes are fetched once) into few
    requests: neighbours closer than ``COALESCE_GAP`` share a GET, the gap read into
    scratch."""
    ranges.sort(key=lambda r: r[0])
    requests: list[Request[D]] = []
    end = -1
    for start, view, dest in ranges:
        if requests and start - end <= COALESCE_GAP:
            if start > end:
                requests[-1].views.append(empty_bytes(start - end))
            requests[-1].views.append(view)
            if requests[-1].fills[-1] is not dest:
                requests[-1].fills.append(dest)
        else:
            requests.append(Request(key, start, [view], [dest]))
        end = start + len(view)
    return requests
