"""A manifest's fields checked against each other, before anything uses them.

A manifest comes from a bucket. Its checksum catches a flipped bit, but an edited, forged or
miswritten one must not make a load allocate terabytes (a tensor size, an item length, a list
index in the planner data), divide by zero (``object_size``), fetch another checkpoint's data
(a key or a stream's home) or fail deep inside DCP with a misleading "Missing key" (a renamed
path). Each field was type- and range-checked as it was read (``manifest_fields.py``); here
every one is checked against the others it constrains, in time linear in the items, and the
first problem is one error naming the field.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from shardckpt.format.chunks import check_chunks
from shardckpt.format.layout import DATA_NAME, STEP_NAME

if TYPE_CHECKING:
    from shardckpt.format.manifest import Manifest
    from shardckpt.format.records import StreamRecord

INT_END = 1 << 63  # sizes, offsets and counts fit an int64 (torch.Size, numpy)

Fail = Callable[[str, str], NoReturn]


def check_manifest(manifest: Manifest, names: list[str], fail: Fail) -> None:
    """Raise through ``fail(field, problem)`` at the first field that disagrees with another."""
    _check_streams(manifest.streams, manifest.world_size, fail)
    _check_tables(manifest, fail)
    _check_ranges(manifest, fail)
    _check_values(manifest, names, fail)
    _check_planner_data(manifest.metadata.planner_data, names, fail)


def _check_streams(streams: list[StreamRecord], world_size: int, fail: Fail) -> None:
    """Streams 0..world_size-1 are the ranks' own, in order; later ones are reused from a
    sibling step (their home). Objects: the layout's keys for their rank, in sequence, all of
    ``object_size`` bytes but the last (1 to ``object_size``); no key listed twice."""
    if len(streams) < world_size:
        fail("world_size", f"{world_size} ranks, but {len(streams)} streams")
    seen: set[tuple[str, str]] = set()
    for i, stream in enumerate(streams):
        at = f"streams[{i}]"
        if i < world_size and (stream.rank != i or stream.home):
            fail(at, f"rank {stream.rank}, home {stream.home!r}: must be rank {i}'s own stream")
        if i >= world_size and not STEP_NAME.fullmatch(stream.home):
            fail(
                f"{at}.home",
                f"{stream.home!r} is not a sibling step (streams after the world_size "
                f"{world_size} ranks' own are reused from one)",
            )
        if stream.object_size == 0:
            fail(f"{at}.object_size", "0")
        last = len(stream.objects) - 1
        for j, obj in enumerate(stream.objects):
            where = f"{at}.objects[{j}]"
            found = DATA_NAME.fullmatch(obj.key)
            if found is None:
                fail(where, f"names object {obj.key!r}, outside its checkpoint")
            if found.group(1) != str(stream.rank) or found.group(2) != f"{j:06d}":
                fail(where, f"key {obj.key!r} is not object {j} of rank {stream.rank}")
            if not 0 < obj.size <= stream.object_size or (
                j < last and obj.size < stream.object_size
            ):
                fail(
                    where,
                    f"size {obj.size}, object_size {stream.object_size}: every object but the "
                    "last has object_size bytes, the last 1 to object_size",
                )
            if (stream.home, obj.key) in seen:
                fail(where, f"{obj.key!r} is listed twice")
            seen.add((stream.home, obj.key))


def _check_tables(manifest: Manifest, fail: Fail) -> None:
    """One item table per rank, in order; a rank's items are in its own stream or in
    reused ones, never in another rank's."""
    world_size, count = manifest.world_size, len(manifest.streams)
    ranks = [table.rank for table in manifest.items]
    if ranks != list(range(world_size)):
        fail("items", f"tables of ranks {ranks[:8]}, for world_size {world_size}")
    for rank, table in enumerate(manifest.items):
        used = set(table.stream) if isinstance(table.stream, list) else {table.stream}
        for stream in sorted(used):
            if stream != rank and not world_size <= stream < count:
                fail(
                    f"items[{rank}].stream",
                    f"{stream} is neither rank {rank}'s own stream nor a reused one "
                    f"(streams {world_size}-{count - 1})",
                )


def _check_ranges(manifest: Manifest, fail: Fail) -> None:
    """Items lie inside their streams and never overlap partly; two items may share the
    same bytes (an incremental save maps equal content to one place), with the same CRC32C.
    A rank's own stream is exactly its items' bytes, without gaps."""
    world_size, streams = manifest.world_size, manifest.streams
    ranges: dict[int, list[tuple[int, int, int, int, int]]] = defaultdict(list)
    for t, table in enumerate(manifest.items):
        for k, (_, _, stream, offset, length, crc, _) in enumerate(table.rows()):
            if length:
                ranges[stream].append((offset, length, crc, t, k))
    for s in sorted(set(ranges) | set(range(world_size))):
        size, end, previous = streams[s].size, 0, None
        for offset, length, crc, t, k in sorted(ranges[s]):
            where = f"items[{t}].offset[{k}] (with its length {length})"
            if previous is not None and previous[:2] == (offset, length):
                if crc != previous[2]:
                    fail(
                        where,
                        f"the bytes of items[{previous[3]}] item {previous[4]}, another CRC32C",
                    )
                continue
            if offset < end:
                fail(where, f"overlaps items[{previous[3]}] item {previous[4]} in streams[{s}]")
            if offset > end and s < world_size:
                fail(where, f"leaves bytes {end}-{offset - 1} of streams[{s}] unused")
            end, previous = offset + length, (offset, length, crc, t, k)
            if end > size:
                fail(where, f"ends at byte {end} of streams[{s}], which has {size}")
        if s < world_size and end != size:
            fail(f"streams[{s}]", f"{size} bytes, but its items end at byte {end}")


def _check_values(manifest: Manifest, names: list[str], fail: Fail) -> None:
    """Every saved value has its items: a non-tensor value one, a tensor chunks that tile
    it exactly (DCP's own check: in bounds, disjoint, covering), no chunk twice."""
    counts = Counter(fqn for table in manifest.items for fqn in table.fqns)
    described = manifest.metadata.state_dict_metadata
    for fqn in names:
        single = isinstance(described[fqn], BytesStorageMetadata)
        if counts[fqn] == 0 or (single and counts[fqn] != 1):
            fail(f"tensors[{fqn!r}]", f"stored by {counts[fqn]} items")
    if len(manifest.locations) != sum(counts.values()):
        fail("items", "a tensor chunk is listed twice")
    errors = check_chunks(manifest.metadata, whole=True)
    if errors:
        fail("items", f"chunks do not tile their tensors: {'; '.join(errors[:3])}")


def _check_planner_data(planner_data: object, names: list[str], fail: Fail) -> None:
    """DCP's map of saved names to their paths in the nested state dict (to rebuild it):
    exactly the saved names, each path spelling its name, containers consistent, and list
    indexes below the number of values (a list is rebuilt up to its highest index)."""
    if planner_data is None:
        return
    if not isinstance(planner_data, dict) or not all(
        isinstance(p, tuple) for p in planner_data.values()
    ):
        fail("planner_data", "not DCP's map of saved names to paths")
    if set(planner_data) != set(names):
        extra = sorted(set(planner_data) - set(names))[:3]
        missing = sorted(set(names) - set(planner_data))[:3]
        fail(
            "planner_data", f"names {extra} are not saved values (tensors), {missing} have no path"
        )
    kinds: dict[tuple[object, ...], type] = {}
    for key, path in planner_data.items():
        if len(path) == 1 and path[0] == key:  # a top-level value: most of them
            continue
        at = f"planner_data[{key!r}]"
        if (
            not path
            or type(path[0]) is not str
            or not all(type(p) is str or (type(p) is int and 0 <= p < len(names)) for p in path)
            or ".".join(map(str, path)) != key
        ):
            fail(at, f"path {list(path)} does not spell its key (list indexes below {len(names)})")
        for i in range(1, len(path)):
            kind = list if type(path[i]) is int else dict
            if kinds.setdefault(path[:i], kind) is not kind:
                fail(at, f"path {list(path)} disagrees with another on what {list(path[:i])} is")
        if kinds.setdefault(path, object) is not object:
            fail(at, f"path {list(path)} is a value and a container of others")
