"""Medians and ratios of one run, the JSON results file, and the printed table.

Conventions: a rep's time is its slowest rank's (each rank timed between the same two
barriers); figures are medians over reps; GB/s is 10^9 bytes of the whole state (all ranks)
per second; "shardckpt vs X" is X's time / shardckpt's time, so > 1 means shardckpt is faster,
and against the raw limit it is the fraction of the limit shardckpt reaches.

``python -m benchmarks.report FILE.json`` recomputes a results file's medians and ratios from
its raw reps, rewrites it, reprints its table and redraws its plot.
"""

from __future__ import annotations

import json
import os
from statistics import median
from typing import Any

from benchmarks.systems import PEERS
from benchmarks.workloads import Workload

MiB = 1 << 20
BASELINE = "shardckpt"


def _slowest(rep: dict[str, Any], op: str) -> dict[str, Any]:
    return max((r[op] for r in rep["ranks"]), key=lambda s: s["seconds"])


def _median_phases(samples: list[dict[str, Any]]) -> dict[str, float]:
    names = sorted({n for s in samples for n in s["phases"]})
    return {n: median(s["phases"].get(n, 0.0) for s in samples) for n in names}


def summarise_system(workload: Workload, reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of one system's reps on ``workload``."""
    figures: dict[str, Any] = {}
    for op in ("save", "load"):
        slowest = [_slowest(rep, op) for rep in reps]
        seconds = median(s["seconds"] for s in slowest)
        samples = [r[op] for rep in reps for r in rep["ranks"]]
        figures[f"{op}_s"] = seconds
        figures[f"{op}_gbps"] = workload.total_bytes / 1e9 / seconds
        figures[f"{op}_peak_rss_mib"] = max(s["peak_rss"] for s in samples) / MiB
        figures[f"{op}_extra_rss_mib"] = (
            max(0, *(s["peak_rss"] - s["rss_before"] for s in samples)) / MiB
        )
        figures[f"{op}_phases"] = _median_phases(slowest)
    # a save that returns before it is committed reports the phase "blocked"; any other
    # blocks its caller for the whole save
    figures["blocked_s"] = figures["save_phases"].get("blocked", figures["save_s"])
    figures["reps"] = len(reps)
    return figures


def ratios(medians: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """For every other system X: X's median time / shardckpt's, for save and load."""
    if BASELINE not in medians:
        return {}
    base = medians[BASELINE]
    return {
        name: {op: m[f"{op}_s"] / base[f"{op}_s"] for op in ("save", "load")}
        for name, m in medians.items()
        if name != BASELINE
    }


def compare(systems: dict[str, Any]) -> dict[str, Any]:
    """A workload's ``ratios`` and ``best_peer`` from its systems' medians."""
    medians = {name: s["median"] for name, s in systems.items() if s["median"]}
    return {"ratios": ratios(medians), "best_peer": best_peers(medians)}


def refresh(results: dict[str, Any]) -> None:
    """Recompute every median and comparison of ``results`` from its raw reps (after a
    change to how they are summarised)."""
    for w in results["workloads"]:
        workload = Workload.parse(w["workload"], w["world_size"])
        for s in w["systems"].values():
            s["median"] = summarise_system(workload, s["reps"]) if s["reps"] else None
        w.update(compare(w["systems"]))


def best_peers(medians: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The fastest peer (a system users pick today) for save and for load."""
    peers = [name for name in medians if name in PEERS]
    if not peers:
        return {}
    return {op: min(peers, key=lambda n: medians[n][f"{op}_s"]) for op in ("save", "load")}


def bit_exact(reps: list[dict[str, Any]], failed: str | None) -> str | None:
    """``"OK"`` if every rep's load was verified byte for byte on every rank and nothing
    failed; ``"MISMATCH"`` if a load returned other bytes; ``"FAILED"`` if the system failed
    otherwise (so the later reps were not verified); None with no rep at all."""
    if failed is not None:
        return "MISMATCH" if "loaded wrong bytes" in failed else "FAILED"
    if not reps:
        return None
    return "OK" if all(rep.get("bit_exact") for rep in reps) else "MISMATCH"


def summarise(workload: Workload, log: Any) -> dict[str, Any]:
    """Everything about one workload: raw reps, medians, request counts, caps, failures,
    ``bit_exact`` (see :func:`bit_exact`), ratios. A system with no successful rep has
    ``median`` None."""
    systems: dict[str, Any] = {}
    for name in log.descriptions:
        reps = log.reps.get(name, [])
        systems[name] = {
            "description": log.descriptions[name],
            "median": summarise_system(workload, reps) if reps else None,
            "bit_exact": bit_exact(reps, log.failed.get(name)),
            "requests": log.requests.get(name),
            "capped": log.capped.get(name),
            "failed": log.failed.get(name),
            "reps": reps,
        }
    loads = [rep["loadavg_1min"] for reps in log.reps.values() for rep in reps]
    return {
        "workload": workload.name,
        "loadavg_1min_range": [min(loads), max(loads)] if loads else None,
        "world_size": workload.world_size,
        "label": workload.label,
        "total_bytes": workload.total_bytes,
        "num_tensors": workload.num_tensors,
        "systems": systems,
        **compare(systems),
    }


def write_json(results: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")


def _requests(counts: dict[str, Any] | None, op: str) -> str:
    if counts is None or op not in counts:
        return "-"
    return str(sum(counts[op].values()))


def table(results: dict[str, Any]) -> str:
    """The printed summary: per workload, one line per system, then the ratios."""
    lines: list[str] = []
    for w in results["workloads"]:
        size_gb = w["total_bytes"] / 1e9
        lines.append("")
        lines.append(
            f"== {w['workload']} at world size {w['world_size']} ({size_gb:.3f} GB; medians of reps) =="
        )
        if w["loadavg_1min_range"]:
            low, high = w["loadavg_1min_range"]
            lines.append(
                f"(1-min load average during the reps: {low:.1f} to {high:.1f}; other work skews timings)"
            )
        lines.append(
            f"{'system':<13} {'reps':>4} {'blocked s':>9} {'save s':>8} {'save GB/s':>9} {'load s':>8} {'load GB/s':>9} "
            f"{'peak RSS MiB save/load':>23} {'+extra MiB':>12} {'requests s/l':>13}"
        )
        for name, s in w["systems"].items():
            m = s["median"]
            if m is None:
                lines.append(f"{name:<13} {0:>4}   FAILED: {s['failed']}")
                continue
            rss = f"{m['save_peak_rss_mib']:.0f}/{m['load_peak_rss_mib']:.0f}"
            extra = f"{m['save_extra_rss_mib']:.0f}/{m['load_extra_rss_mib']:.0f}"
            req = f"{_requests(s['requests'], 'save')}/{_requests(s['requests'], 'load')}"
            lines.append(
                f"{name:<13} {m['reps']:>4} {m['blocked_s']:>9.3f} {m['save_s']:>8.3f} {m['save_gbps']:>9.3f} {m['load_s']:>8.3f} "
                f"{m['load_gbps']:>9.3f} {rss:>23} {extra:>12} {req:>13}"
            )
            phases = {
                **{f"save.{k}": v for k, v in m["save_phases"].items()},
                **{f"load.{k}": v for k, v in m["load_phases"].items()},
            }
            if phases:
                lines.append(
                    "            phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items())
                )
            if s.get("bit_exact") not in (None, "OK"):
                lines.append(f"            bit-exact: {s['bit_exact']}")
            if s["capped"]:
                lines.append(f"            capped: {s['capped']}")
            if s["failed"]:
                lines.append(
                    f"            FAILED later (figures are of the reps before): {s['failed']}"
                )
        exact = [s.get("bit_exact") for s in w["systems"].values()]
        if exact and all(e == "OK" for e in exact):
            lines.append("every load verified bit for bit on every rank: OK")
        if w["ratios"]:
            lines.append("shardckpt vs X (X time / shardckpt time; >1: shardckpt faster):")
            for name, r in w["ratios"].items():
                lines.append(f"  vs {name:<12} save {r['save']:6.2f}x   load {r['load']:6.2f}x")
            best = w.get("best_peer", {})
            if best:
                lines.append(
                    "best peer: "
                    + ", ".join(f"{op} {n} ({w['ratios'][n][op]:.2f}x)" for op, n in best.items())
                )
            if "raw" in w["ratios"]:
                raw = w["ratios"]["raw"]
                lines.append(
                    f"shardckpt at {raw['save']:.0%} of the raw parallel PUT limit, "
                    f"{raw['load']:.0%} of raw GET"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    from benchmarks.plot import plot

    for path in sys.argv[1:] or sys.exit("usage: python -m benchmarks.report RESULTS.json ..."):
        with open(path) as f:
            results = json.load(f)
        refresh(results)
        write_json(results, path)
        print(table(results))
        print(plot(results, path[: -len(".json")] + ".png") or f"plot: {path[: -len('.json')]}.png")
