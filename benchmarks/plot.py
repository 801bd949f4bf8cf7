"""The figure: save and load GB/s and the seconds a save blocks its caller, per system,
grouped by workload (log scales)."""

from __future__ import annotations

from typing import Any


def plot(results: dict[str, Any], path: str) -> str | None:
    """Draw ``results`` to ``path`` (PNG); return None, or why no plot was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    workloads = results["workloads"]
    systems = list(dict.fromkeys(name for w in workloads for name in w["systems"]))
    if not systems:
        return "no results to plot"
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 3.5 * len(workloads) + 6), 4.5))
    width = 0.8 / len(systems)
    panels = (
        ("save_gbps", "save (GB/s, higher is better)"),
        ("load_gbps", "load (GB/s, higher is better)"),
        ("blocked_s", "save blocks the caller (s, lower is better)"),
    )
    for ax, (figure, title) in zip(axes, panels, strict=True):
        for i, name in enumerate(systems):
            xs, ys = [], []
            for j, w in enumerate(workloads):
                if w["systems"].get(name, {}).get("median"):
                    xs.append(j + (i - (len(systems) - 1) / 2) * width)
                    ys.append(w["systems"][name]["median"][figure])
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(workloads)), [w["label"] for w in workloads])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("median of reps (GB/s: 10^9 bytes/s)")
    axes[2].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    server = results["config"]["server"]
    fig.suptitle(
        f"{results['name']}: DCP checkpoint to a local {server} S3 server, {results['machine']['cpu_count']} CPUs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
