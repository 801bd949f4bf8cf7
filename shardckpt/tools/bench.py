"""How fast are checkpoints against my bucket? ``shardckpt bench URI`` answers it with what is
installed: no source checkout, no server of its own (the peer harness, ``python -m
benchmarks`` in the repository, compares shardckpt with other libraries on a local server).

:func:`run_bench` saves a checkpoint of random float32 tensors under a fresh prefix of the
URI (``shardckpt-bench-<12 hex>``: no name of anyone else's can clash), loads it back and
checks it bit for bit, then PUTs and GETs the same bytes as plain objects of the writer's
object size with the writer's number of threads (the raw limit of that store: what the
checkpoint's time is compared with). Each is repeated ``reps`` times, each save to a
checkpoint of its own; the medians are reported. Last it deletes exactly the keys it wrote:
the raw objects it named, each checkpoint's manifest and the data the manifest names
(manifests first). Nothing else under the URI is touched, so a save that failed midway
leaves its data objects behind: ``shardckpt gc`` on the prefix removes them.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from shardckpt.dcp.writer import WriterOptions
from shardckpt.errors import ChecksumMismatchError, ConfigError
from shardckpt.format.layout import Layout
from shardckpt.retention.deletion import manifest_keys
from shardckpt.store import ObjectStore, open_store
from shardckpt.store.base import gather, slice_views
from shardckpt.tools.single import load, save

logger = logging.getLogger(__name__)

MiB = 1 << 20
PHASES = ("save", "load", "raw PUT", "raw GET")


@dataclass(frozen=True)
class BenchResult:
    """What :func:`run_bench` measured: ``uri`` (the prefix it wrote under, deleted since),
    ``nbytes`` and ``tensors`` of the state, ``reps``, the median ``seconds`` of each phase
    (:data:`PHASES`) and how many keys it ``deleted``."""

    uri: str
    nbytes: int
    tensors: int
    reps: int
    seconds: dict[str, float]
    deleted: int

    def gb_per_s(self, phase: str) -> float:
        return self.nbytes / self.seconds[phase] / 1e9


@dataclass
class _Run:
    """One benchmark's store, prefix, state and the keys it wrote (to delete them)."""

    store: ObjectStore
    prefix: str
    state: dict[str, torch.Tensor]
    options: dict[str, Any]
    manifests: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})

    def views(self) -> list[memoryview]:
        return [memoryview(t.numpy()).cast("B") for t in self.state.values()]


def run_bench(
    uri: str, *, size_mib: float = 256, tensors: int = 16, reps: int = 3, **store_options: Any
) -> BenchResult:
    """Measure checkpoint save and load of ``size_mib`` MiB in ``tensors`` tensors against
    ``uri`` (store options: ``endpoint``, ``region``, ...), and raw PUT/GET of the same bytes."""
    if size_mib <= 0 or tensors < 1 or reps < 1:
        raise ConfigError(
            f"size_mib must be > 0, tensors and reps >= 1; got {size_mib}, {tensors}, {reps}"
        )
    store = open_store(uri, **store_options)
    run = _Run(
        store,
        f"shardckpt-bench-{uuid.uuid4().hex[:12]}",
        _random_state(size_mib, tensors),
        store_options,
    )
    try:
        for rep in range(reps):
            _checkpoint(run, rep)
            _raw(run, rep)
    except BaseException:
        logger.warning(
            "the benchmark failed; a save cut short leaves data objects under %s: "
            "`shardckpt gc %s --grace 0s` deletes them",
            store.uri(run.prefix), store.uri(run.prefix),
        )  # fmt: skip
        raise
    finally:
        store.delete(run.manifests)  # manifests first: no checkpoint names missing data
        store.delete(run.data)
        store.close()
    return BenchResult(
        uri=store.uri(run.prefix),
        nbytes=sum(t.nbytes for t in run.state.values()),
        tensors=tensors,
        reps=reps,
        seconds={p: statistics.median(run.times[p]) for p in PHASES},
        deleted=len(run.manifests) + len(run.data),
    )


def _random_state(size_mib: float, tensors: int) -> dict[str, torch.Tensor]:
    numel = max(1, int(size_mib * MiB) // 4 // tensors)  # float32
    g = torch.Generator().manual_seed(0)
    return {f"t{i:04d}": torch.randn(numel, generator=g) for i in range(tensors)}


def _timed(run: _Run, phase: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    run.times[phase].append(time.perf_counter() - start)
    return out


def _checkpoint(run: _Run, rep: int) -> None:
    """Save the state as one checkpoint, note its keys, load it back and compare."""
    layout = Layout(f"{run.prefix}/ckpt-{rep}")
    uri = run.store.uri(layout.prefix)
    _timed(run, "save", lambda: save(run.state, uri, **run.options))
    keys = manifest_keys(run.store, layout)  # what the save wrote: its manifest and data
    run.manifests.append(layout.manifest_key)
    run.data += sorted(keys - {layout.manifest_key})
    back = _timed(run, "load", lambda: load(uri, **run.options))
    for name, tensor in run.state.items():
        if name not in back or not torch.equal(back[name], tensor):
            raise ChecksumMismatchError(f"{uri}: {name} loaded back differs from what was saved")


def _raw(run: _Run, rep: int) -> None:
    """PUT the state's bytes as objects of the writer's size, then GET them back."""
    views = run.views()
    total = sum(len(v) for v in views)
    writer = WriterOptions()
    size = writer.object_size_for(total)
    starts = range(0, total, size)
    keys = [f"{run.prefix}/raw-{rep}/{i:06d}" for i in range(len(starts))]
    run.data += keys  # before the PUTs: deleting a key never written is harmless
    pieces = [slice_views(views, start, size) for start in starts]
    into = memoryview(bytearray(total))
    with ThreadPoolExecutor(writer.num_threads) as pool:

        def each(fn: Callable[[str, Sequence[memoryview], int], None]) -> None:
            gather([pool.submit(fn, k, p, s) for k, p, s in zip(keys, pieces, starts, strict=True)])

        _timed(run, "raw PUT", lambda: each(lambda k, p, s: run.store.put(k, p)))
        _timed(
            run,
            "raw GET",
            lambda: each(lambda k, p, s: run.store.get_into(k, 0, [into[s : s + size]])),
        )
