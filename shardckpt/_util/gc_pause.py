"""Pausing Python's cyclic garbage collector while building millions of small objects.

Parsing or planning a 1,024-rank checkpoint makes a million objects that live on; the
collector rescans them as they pile up, which multiplies the time by 3 to 5
(``benchmarks/scale.py``). Reference counting still frees everything while it is paused.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
