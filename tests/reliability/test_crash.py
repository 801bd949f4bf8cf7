"""Seeded random crashes: a 2-rank job that has committed step 2 is SIGKILLed (the whole
process group) at a random moment of saving step 3, over and over.

Kill moments are drawn from the job's own timeline of step 2 (snapshot, upload, commit) so
every phase gets hit; the phase actually hit is read back from what the store holds. After
every kill, a fresh process checks: step 2 loads bit-exact and verifies; step 3 is invisible
to ``steps()``/``latest()``/loaders unless its manifest was committed (then it loads
bit-exact); gc with grace 0 removes every leftover and touches nothing committed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shardckpt.testing.servers import LocalS3Server
from tests.reliability.conftest import TALLY
from tests.reliability.workers import Zygote

SEED = 20260427
COMMITTED, SAVING = "2", 3
NOT_FOUND = {"IncompleteCheckpointError", "CheckpointNotFoundError"}


def _delay(rng: random.Random, target: str, t: dict[str, float]) -> float:
    """A kill moment (seconds after save(3) starts) aimed at ``target``, from step 2's timeline."""
    snap, up, done = t["snapshot"], t.get("uploaded", t["snapshot"]), t["committed"]
    lo, hi = {
        "snapshot": (0.0, snap),
        "upload": (snap + 0.6 * (up - snap), up),  # its start is mostly DCP's planning
        "commit": (up, done),
        "end": (done * 0.9, done * 1.05),
        "anywhere": (0.0, done * 1.1),
    }[target]
    return rng.uniform(lo, max(hi, lo))


def _phase(facts: dict[str, Any], snapshot_seen: bool) -> str:
    """Which phase of the save the kill hit, from what the store holds."""
    if int(SAVING) in facts["steps"]:
        return "after commit"
    if facts["manifest_tmp"]:
        return "manifest put"
    names = {k.rsplit("/", 1)[1] for k in facts["keys"]}
    if names >= set(facts["expected_objects"]):
        return "data durable, no manifest"
    if names or any(f"step-000000000{SAVING}/" in p for p in facts["pending"]):
        return "upload"
    return "planning" if snapshot_seen else "snapshot"


def _check(facts: dict[str, Any], where: str) -> None:
    """The invariants after a kill, before and after gc."""
    before, after = facts["before"], facts["after"]
    committed = SAVING in before["steps"]
    for state in (before, after):
        assert state["steps"][-2:] in ([1, 2], [2, 3]) and int(COMMITTED) in state["steps"], (
            where,
            state,
        )
        assert all(state["exact"].values()), (
            f"{where}: a committed step does not load bit-exact: {state['exact']}"
        )
        assert all(state["verified"].values()), f"{where}: verify failed: {state['verified']}"
        assert state["latest"] == (SAVING if committed else 2), (where, state)
        if not committed:
            for error in (state["load_error"], state["reader_error"]):
                assert error.split(":")[0] in NOT_FOUND and "step-0000000003" in error, (
                    where,
                    error,
                )
            assert "no manifest" in state["dcp_error"] or "no checkpoint" in state["dcp_error"], (
                where
            )
    assert after["steps"] == before["steps"], where
    assert after["pending"] == [], f"{where}: gc left unfinished uploads {after['pending']}"
    if committed:
        assert set(after["keys"]) <= set(before["keys"]), where
    else:
        assert after["keys"] == [], f"{where}: gc left {after['keys']}"


def _run_kills(
    zygote: Zygote,
    roots: list[tuple[str, dict[str, Any]]],
    sizes: list[float],
    rng: random.Random,
    targets: tuple[str, ...] = (
        "snapshot",
        "upload",
        "commit",
        "upload",
        "anywhere",
        "commit",
        "end",
    ),
) -> Counter[str]:
    phases: Counter[str] = Counter()
    for i, (root, store_options) in enumerate(roots):
        job = f"{uuid.uuid4().hex[:6]}-{i}"
        common = {
            "job": job,
            "root": root,
            "seed": rng.randrange(1 << 20),
            "mib": rng.choice(sizes),
            "store_options": store_options,
        }
        zygote.send(op="job", **common)
        pgid = zygote.expect("started")["pgid"]
        try:
            go = zygote.expect("go", timeout=60)
            target = targets[i % len(targets)]
            delay = _delay(rng, target, go["timeline"])
            kill_at = time.monotonic() + delay
            seen: list[str] = []
            while not seen or seen[-1] != "exited":
                try:
                    seen.append(zygote.next_event(max(0.0, kill_at - time.monotonic()))["event"])
                except queue.Empty:
                    break
            killed = "exited" not in seen
            if killed:
                os.killpg(pgid, signal.SIGKILL)
                while (event := zygote.next_event(30))["event"] != "exited":
                    seen.append(event["event"])  # printed before the kill, read after it
                status = event["status"]
                assert set(status) <= {0, -signal.SIGKILL}, status
                killed = -signal.SIGKILL in status  # not if the job ended just before the kill
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)  # leave no job behind a failed check
            raise
        zygote.send(op="verify", **common)
        facts = zygote.expect("verified", timeout=120)["facts"]
        where = f"kill {i} ({target}, {delay * 1000:.0f} ms, {common['mib']} MiB, {root})"
        _check(facts, where)
        phase = _phase(facts["before"], "snapshot" in seen) if killed else "not killed: finished"
        phases[phase] += 1
        print(where, {k: round(v * 1000) for k, v in go["timeline"].items()}, phase, seen)
    return phases


@pytest.mark.slow
def test_random_kills_never_lose_or_half_commit(
    zygote: Zygote, tmp_path: Path, moto: LocalS3Server
) -> None:
    rng = random.Random(SEED)
    roots: list[tuple[str, dict[str, Any]]] = [(str(tmp_path / f"run{i}"), {}) for i in range(36)]
    for i in range(6):
        bucket = f"crash-{uuid.uuid4().hex[:10]}"
        moto.create_bucket(bucket)
        roots.append((f"s3://{bucket}/run{i}", {"endpoint": moto.endpoint}))
    local = _run_kills(zygote, roots[:36], [0.5, 2, 6, 12], rng)
    s3 = _run_kills(zygote, roots[36:], [1, 4], rng)
    # The data phase of a small local save lasts a few ms, and the kill moment comes from the
    # previous save's timeline: aim more kills at it until one lands there (bounded).
    for i in range(12):
        if "upload" in local:
            break
        root = [(str(tmp_path / f"upload{i}"), {})]
        local += _run_kills(zygote, root, [6, 12], rng, targets=("upload",))
    phases = local + s3
    for phase, n in phases.items():
        TALLY[f"kill phase: {phase}"] += n
    kills = sum(n for p, n in phases.items() if not p.startswith("not killed"))
    TALLY["kill points"] += kills
    print(f"\nlocal: {dict(local)}\nmoto: {dict(s3)}")
    assert kills >= 30, phases
    assert sum(n for p, n in s3.items() if not p.startswith("not killed")) >= 3, s3
    # Every phase of a save was hit (the narrow manifest-put window only by chance).
    hit = set(phases)
    assert {"upload", "after commit"} <= hit and hit & {"snapshot", "planning"}, phases
    assert "data durable, no manifest" in hit or "manifest put" in hit, phases
