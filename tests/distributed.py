"""Run a function on N real processes joined in a gloo process group: the benchmarks' runner,
with a deadline so that a rank stuck in a collective fails the test instead of hanging it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks import spawn


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180
) -> list[Any]:
    return spawn.run_ranks(fn, world_size, *args, timeout=timeout)
