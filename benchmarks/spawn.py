"""Run one function on N processes joined in a gloo process group (spawned, loopback only)."""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    results: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            results.put((rank, "ok", fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # reported to the parent, which raises it
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float | None = None
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes (they inherit
    the environment); return each rank's result, or raise ``RuntimeError`` with the failing
    rank's traceback, as soon as a rank dies without reporting, or when no rank has reported
    for ``timeout`` seconds (None: wait as long as the ranks live)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    errors: list[str] = []
    last_report = time.monotonic()
    try:
        while len(values) + len(errors) < world_size:
            try:
                rank, status, value = results.get(timeout=5)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    errors.append(
                        f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})"
                    )
                    break
                if timeout is not None and time.monotonic() - last_report > timeout:
                    silent = [r for r in range(world_size) if r not in values]
                    errors.append(f"ranks {silent} reported nothing for {timeout:.0f}s")
                    break
                continue
            last_report = time.monotonic()
            if status == "ok":
                values[rank] = value
            else:
                errors.append(f"rank {rank}: {value}")
                break  # the other ranks are stuck in a collective: stop them
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [values[r] for r in range(world_size)]
