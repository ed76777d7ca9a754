"""One PNG per metric (a bar per path), plus the memory sub-benchmark's curve."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshnode.bench import report

COLORS = {
    "direct": "#7f7f7f",
    "meshnode": "#1f77b4",
    "haproxy-mtls": "#d62728",
    "stunnel-mtls": "#ff7f0e",
    "central-lb": "#9467bd",
    "meshnode-same-node": "#17becf",
}


def write_plots(
    summary: Mapping[str, Mapping[str, float | None]],
    out: Path,
    memory: Mapping[str, Any] | None = None,
    subtitle: str = "",
) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        return []  # plots need the bench extra (pip install 'meshnode[bench]'); the table stands

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [p for p in report.PATHS if p in summary]
    written: list[Path] = []
    for m in report.METRICS if paths else ():
        values = [summary[p].get(m.key) for p in paths]
        fig, ax = plt.subplots(figsize=(8, 4))
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(paths, heights, color=[COLORS.get(p, "#333333") for p in paths])
        for bar, v in zip(bars, values, strict=True):
            label = "n/a" if v is None else report.fmt_value(m.key, v)
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=9,
                xytext=(0, 2),
                textcoords="offset points",
            )
        better = "higher is better" if m.higher_is_better else "lower is better"
        ax.set_title(f"{m.label} ({better})" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
        ax.set_ylabel(m.unit)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.tick_params(axis="x", labelsize=8)
        ax.margins(y=0.15)
        fig.tight_layout()
        path = out / f"{m.key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if memory and memory.get("points"):
        pts = memory["points"]
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = [p["workloads"] for p in pts]
        ax.plot(xs, [p["rss_mb"] for p in pts], marker="o", label="ztunnel RSS (one per node)")
        one = memory.get("haproxy_sidecar_rss_mb")
        if one:
            ax.plot(
                xs,
                [one * x for x in xs],
                linestyle="--",
                marker="x",
                label="N HAProxy sidecars (estimate: N x one sidecar's RSS)",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("workloads on the node")
        ax.set_ylabel("MB")
        ax.set_title(
            "proxy memory on one node vs workloads on it\n"
            "(ztunnel measured after a connection churn; sidecars estimated)",
            fontsize=10,
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "memory.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
