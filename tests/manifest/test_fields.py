"""A manifest is checked field by field before anything uses it (issue 13, item 7).

The fuzz test takes a real manifest (an incremental step, so streams of this checkpoint and a
reused one with a home; several dtypes, a scalar, a non-tensor value, nested dicts and lists so
the planner data has paths) and changes every field, one at a time, to huge, negative, zero
and path-like values, re-sealing the checksum so that the field checks are what is tested.
Each load gives the same values or one ManifestError naming the field, within seconds; never
an allocation failure, a hang, another error or another checkpoint's data; and verify refuses
exactly what load refuses (plus CRC32C fields, which only the data can contradict).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt import Checkpointer, ChecksumMismatchError, ManifestError
from shardckpt.cli.main import main
from shardckpt.format.catalog import step_name
from shardckpt.format.layout import DATA_NAME, STEP_NAME, Layout
from shardckpt.format.manifest import SEAL_FIELD, Manifest, read_manifest
from shardckpt.store import ObjectStore, open_store
from shardckpt.tools.single import load
from shardckpt.tools.verify import verify_checkpoint
from tests.conftest import make_target
from tests.manifest.edit import rewrite_manifest, sealed, unsealed

HUGE = 1 << 70  # beyond int64
BIG = (1 << 62) + 1  # within int64: only the cross-checks can refuse it
STRINGS = ["../x", "/etc", "step-0000000001", ""]
SECONDS = 5.0


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {
            "w": torch.randn(3, 5, generator=g),
            "frozen": torch.arange(6, dtype=torch.int64).reshape(2, 3),  # reused at step 2
            "scale": torch.tensor(2.5),
        },
        "layers": [{"b": torch.ones(2) * step}, {"b": torch.zeros(2)}],  # list: indexes in paths
        "extra": {"epoch": step, "tags": ["a", "b"]},
    }


def _saved(root: str, options: dict[str, Any]) -> ObjectStore:
    with Checkpointer(root, incremental=True, **options) as ck:
        ck.save(1, _state(1)).wait()
        ck.save(2, _state(2)).wait()
    return open_store(root, **options)


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every scalar field's path; for long item columns, their first and last entries."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        indexes = range(len(value))
        if path[:1] == ("items",) and len(value) > 2 and not isinstance(value[0], list):
            indexes = [0, len(value) - 1]
        for i in indexes:
            yield from _leaves(value[i], (*path, i))
    else:
        yield path


def _mutations(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value, 0]
    if isinstance(value, int | float):
        return [HUGE, BIG, -1, 0]
    if isinstance(value, str):
        return [*STRINGS, 7]
    return [0, "../x"]  # None


def _renames(doc: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(section, old key, new key): renamed values and planner-data keys."""
    for section, mapping in (("tensors", doc["tensors"]), ("planner_data", doc["planner_data"])):
        mapping = mapping.get("__paths__", mapping)
        for key in list(mapping)[:3]:
            for new in ("../x", "step-0000000001", "model.other"):
                yield section, key, new


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for part in path[:-1]:
        doc = doc[part]
    doc[path[-1]] = value


def _outcome(root: str, options: dict[str, Any]) -> tuple[str, Any]:
    """("ok", state), ("refused", error): a whole-checkpoint load of step 2, as export does."""
    store = open_store(root, **options)
    try:
        read_manifest(store, Layout(step_name(2)))  # what the Checkpointer and export check first
        return "ok", load(f"{root}/{step_name(2)}", **options)
    except CheckpointException as exc:
        return "refused", next(iter(exc.failures.values()))[0]
    except (ManifestError, ChecksumMismatchError) as exc:
        return "refused", exc


def _verify(store: ObjectStore) -> str | None:
    try:
        report = verify_checkpoint(store, Layout(step_name(2)))
    except ManifestError as exc:
        return str(exc)
    return None if report.ok else str(report.problems)


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and got.keys() == want.keys()
            and all(_same(got[k], v) for k, v in want.items())
        )
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(_same(g, w) for g, w in zip(got, want, strict=True))
        )
    return type(got) is type(want) and got == want


def _check(
    root: str,
    options: dict[str, Any],
    original: bytes,
    doc: dict[str, Any],
    field: str,
    path: tuple[Any, ...] = (),
) -> str:
    """Store ``doc`` (re-sealed), load and verify it; assert the rule; return the outcome."""
    store = open_store(root, **options)
    key = Layout(step_name(2)).manifest_key
    store.put(key, [sealed(doc)])
    try:
        started = time.perf_counter()
        kind, value = _outcome(root, options)
        took = time.perf_counter() - started
        refused_by_verify = _verify(store)
    finally:
        store.put(key, [original])
    what = f"{field} {path}"
    assert took < SECONDS, f"{what}: {took:.1f}s"
    crc_field = path[-1:] == (2,) and "objects" in path or "crc32c" in path
    if kind == "ok":
        assert _same(value, _state(2)), f"{what}: loaded other values"
        assert refused_by_verify is None or crc_field, (
            f"{what}: verify refused: {refused_by_verify}"
        )
        return "same"
    if isinstance(value, ChecksumMismatchError):  # an item CRC32C the data contradicts
        assert "crc32c" in path, f"{what}: {value!r}"
    else:
        assert isinstance(value, ManifestError), f"{what}: {type(value).__name__}: {value}"
        assert field in str(value) and key in str(value), f"{what}: {value}"
    assert refused_by_verify is not None, f"{what}: load refused ({value}), verify did not"
    return "refused"


@pytest.fixture
def local_root(tmp_path: Path) -> str:
    root = str(tmp_path / "run")
    _saved(root, {})
    return root


def test_every_field_changed_alone_gives_the_same_values_or_names_the_field(local_root) -> None:  # type: ignore[no-untyped-def]
    store = open_store(local_root)
    original = store.get(Layout(step_name(2)).manifest_key)
    doc = unsealed(original)
    assert doc["version"] == 3 and len(doc["streams"]) == 2 and doc["streams"][1]["home"]
    assert any(isinstance(p, int) for p in sum(doc["planner_data"]["__paths__"].values(), []))
    outcomes: dict[str, int] = {"same": 0, "refused": 0}
    started = time.perf_counter()
    for path in _leaves(doc):
        if path == ("created",) or path[:1] == ("attributes",):
            continue  # free-form: any value loads the same (checked once below)
        value = doc
        for part in path:
            value = value[part]
        for new in _mutations(value):
            edited = json.loads(json.dumps(doc))
            _set(edited, path, new)
            outcome = _check(local_root, {}, original, edited, str(path[0]), path)
            outcomes[outcome] += 1
    for section, old, new in _renames(doc):
        edited = json.loads(json.dumps(doc))
        mapping = edited[section].get("__paths__", edited[section])
        mapping[new] = mapping.pop(old)
        assert _check(local_root, {}, original, edited, section) == "refused"
    for field in ("created", "attributes"):
        edited = json.loads(json.dumps(doc))
        edited[field] = "../x"
        _check(local_root, {}, original, edited, field, (field,))
    assert outcomes["refused"] > 250 and outcomes["same"] > 10, outcomes
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d["streams"][0].update(object_size=0), "streams[0].object_size"),
        (lambda d: d["tensors"]["model.w"][1].__setitem__(0, 1 << 40), "model.w invalid fill"),
        (
            lambda d: d["planner_data"]["__paths__"]["layers.0.b"].__setitem__(1, 10**9),
            "planner_data",
        ),
        (lambda d: d["streams"][1].update(home="../step-0000000001"), "streams[1].home"),
        (lambda d: d["streams"][1].update(home=step_name(2)), "streams[1].home"),
        (lambda d: d["streams"][0].update(home=step_name(1)), "streams[0]"),
        (lambda d: d.update(world_size=3), "world_size"),
    ],
    ids=[
        "object-size-0",
        "4-TiB-tensor",
        "list-index-1e9",
        "home-path",
        "home-itself",
        "own-stream-home",
        "world-size",
    ],
)
def test_reported_cases_are_refused_at_once_on_s3(edit, field, moto, request, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The cases of the issue (a 4 TiB allocation, a MemoryError after 30 s, a division by
    zero, a home out of the root or naming the checkpoint itself), on S3: one ManifestError
    naming the field, from load, verify and the CLI, with no data fetched."""
    target = make_target("moto-boto3", request, tmp_path)
    root = f"{target.uri}/run"
    store = _saved(root, target.options)
    key = Layout(step_name(2)).manifest_key
    rewrite_manifest(store, key, edit)
    before = store.stats.bytes_got
    started = time.perf_counter()
    kind, error = _outcome(root, target.options)
    assert time.perf_counter() - started < SECONDS
    assert kind == "refused" and isinstance(error, ManifestError), repr(error)
    assert field in str(error) and store.uri(key) in str(error)
    assert _verify(store) == str(error)
    assert store.stats.bytes_got - before < 2 * len(store.get(key))  # manifests only
    cli = ["--endpoint", str(target.options["endpoint"])]
    assert main(["verify", root, *cli]) == 1
    assert main(["export", root, str(tmp_path / "x.pt"), *cli]) == 1


def test_a_flipped_bit_anywhere_is_a_checksum_mismatch(local_root) -> None:  # type: ignore[no-untyped-def]
    store = open_store(local_root)
    key = Layout(step_name(2)).manifest_key
    data = store.get(key)
    rng = random.Random(13)
    for position in range(len(data)):  # every byte, the checksum field's own included
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        with pytest.raises(ManifestError, match="checksum mismatch"):
            Manifest.from_json(bytes(flipped), "m")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 4
    store.put(key, [bytes(flipped)])
    with pytest.raises(ManifestError, match="checksum mismatch") as info:
        read_manifest(store, Layout(step_name(2)))
    assert store.uri(key) in str(info.value)
    assert _verify(store) == str(info.value)


def test_version_2_without_a_checksum_is_read_with_the_same_checks(local_root) -> None:  # type: ignore[no-untyped-def]
    store = open_store(local_root)
    key = Layout(step_name(2)).manifest_key
    doc = unsealed(store.get(key)) | {"version": 2}
    store.put(key, [json.dumps(doc, separators=(",", ":")).encode()])
    kind, state = _outcome(local_root, {})
    assert kind == "ok" and _same(state, _state(2)) and _verify(store) is None
    doc["streams"][0]["object_size"] = 0
    store.put(key, [json.dumps(doc).encode()])
    kind, error = _outcome(local_root, {})
    assert isinstance(error, ManifestError) and "streams[0].object_size" in str(error)
    unsealed_v3 = json.dumps(doc | {"version": 3}, separators=(",", ":")).encode()
    with pytest.raises(ManifestError, match=SEAL_FIELD):
        Manifest.from_json(unsealed_v3, "m")


def test_the_names_a_manifest_may_use_are_the_layouts_own() -> None:
    layout = Layout(fanout=256)
    for rank, seq in ((0, 0), (17, 123456), (3, 1_000_000)):
        found = DATA_NAME.fullmatch(layout.data_name("attempt-0123456789abcdef", rank, seq))
        assert found is not None and found.groups() == (str(rank), f"{seq:06d}")
    assert all(STEP_NAME.fullmatch(step_name(s)) for s in (0, 7, 10**10 + 3))
    assert not any(
        STEP_NAME.fullmatch(n) for n in ("step-1", "step-00000000001", "../step-0000000001")
    )
