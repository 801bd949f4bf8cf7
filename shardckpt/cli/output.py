"""How the ``shardckpt`` commands show things to a person: sizes, ages and a progress bar."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def human_age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


@contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (bytes, rate, ETA), fed by the library's ``on_bytes(n, total)``
    callbacks from any thread; ``label`` is short (a URI would leave no room for the bar).
    tqdm draws it only on a terminal (``disable=None``): a piped or logged stderr gets nothing."""
    lock = threading.Lock()  # tqdm's counter is not thread-safe
    with tqdm(
        desc=label,
        unit="iB",  # with unit_divisor 1024: KiB, MiB, GiB
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=None,
        dynamic_ncols=True,
    ) as bar:

        def on_bytes(n: int, total: int) -> None:
            with lock:
                bar.total = total  # known once the library has read the manifest
                bar.update(n)

        yield on_bytes
