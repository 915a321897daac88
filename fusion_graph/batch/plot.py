"""The evaluation's plot: quality against N per strategy, each point with its bootstrap
95 % interval as an error bar (the single sample as a line with a shaded band)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fusion_graph.batch.records import StrategyScore

_STYLE = {
    "single": ("#555555", "--", "o"),
    "bon-judge": ("#1f77b4", "-", "s"),
    "bon-pairwise": ("#2ca02c", "-", "^"),
    "majority-vote": ("#9467bd", "-", "D"),
    "majority-vote-early": ("#8c564b", "--", "d"),
    "majority-vote@fusion-budget": ("#e377c2", ":", "v"),
    "fusion": ("#d62728", "-", "o"),
    "oracle": ("#999999", ":", "x"),
}

_NUDGE = 1.035
"""Strategies' points at one N are spread by this factor apiece (the x axis is log 2), so
their error bars do not hide each other."""


def _bounds(s: StrategyScore, metric: str) -> tuple[float, float, float] | None:
    value = getattr(s, metric)
    if value is None:
        return None
    low, high = getattr(s, f"{metric}_low"), getattr(s, f"{metric}_high")
    return value, value if low is None else low, value if high is None else high


def plot_scores(
    scores: Sequence[StrategyScore], path: Path, *, baseline: str, title: str | None = None
) -> Path:
    """A PNG of quality against N per strategy: contains-answer accuracy (when there are
    references) and win-rate against the baseline (when judged), with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({s.n for s in scores})
    panels: list[tuple[str, str]] = []
    if any(s.contains is not None for s in scores):
        panels.append(("contains", "accuracy (contains answer), 95% CI"))
    if any(s.win_rate is not None for s in scores):
        panels.append(("win_rate", f"win-rate vs {baseline}, 95% CI"))
    if not panels:
        panels.append(("contains", "accuracy (contains answer)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    names = list(dict.fromkeys(s.strategy for s in scores))
    for ax, (metric, label) in zip(axes[0], panels, strict=True):
        series = {}
        for name in names:
            rows = sorted((s for s in scores if s.strategy == name), key=lambda s: s.n)
            points = [(s.n, b) for s in rows if (b := _bounds(s, metric)) is not None]
            if points:
                series[name] = points
        spread = len([name for name in series if name != "single"])
        drawn = 0
        for name, points in series.items():
            color, line, marker = _STYLE.get(name, (None, "-", "o"))
            if name == "single":
                value, low, high = points[0][1]
                ax.axhline(value, color=color, linestyle="--", linewidth=1.2, label=name)
                ax.axhspan(low, high, color=color, alpha=0.08, linewidth=0)
                continue
            shift = _NUDGE ** (drawn - (spread - 1) / 2)
            drawn += 1
            xs = [n * shift for n, _ in points]
            ys = [v for _, (v, _, _) in points]
            errors = [[v - lo for _, (v, lo, _) in points], [hi - v for _, (v, _, hi) in points]]
            ax.errorbar(
                xs,
                ys,
                yerr=errors,
                color=color,
                linestyle=line,
                marker=marker,
                capsize=3,
                elinewidth=0.9,
                label=name,
            )
        if metric == "win_rate":
            ax.axhline(0.5, color="#bbbbbb", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("N (candidates)")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
