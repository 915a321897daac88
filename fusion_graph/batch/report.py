"""The results of an evaluation: per-item records, the table (one row per strategy and
N, then the oracle rows: the share of items where any of the first N candidates is
right), and the files (``eval.json``, ``eval.csv``, ``eval.md``, ``answers.jsonl``, a PNG
plot).

Each row also says what the strategy cost per item: the candidates it used (``samples``)
and its tokens (``tokens``: the used candidates' reported total tokens plus its decision
calls', win-rate judging excluded). :func:`match_budget` finds how deep a vote can go on a
fusion strategy's tokens (the ``majority-vote@fusion-budget`` rows).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from fusion_graph.batch.metrics import win_rate
from fusion_graph.batch.models import JobStats
from fusion_graph.nodes.judges import PairOutcome


class CandidateRecord(BaseModel):
    """One candidate of one item, as scored."""

    index: int
    model: str
    text: str | None
    error: str | None
    replayed: bool
    exact: bool | None = None
    contains: bool | None = None
    tokens: int = 0
    """Its reported total tokens (prompt and reply; 0 when the model reports none)."""


class AnswerRecord(BaseModel):
    """One strategy's answer at one N for one item."""

    strategy: str
    n: int
    text: str | None
    error: str | None = None
    selected_index: int | None = None
    fused: bool = False
    fallback: bool = False
    method: str | None = None
    exact: bool | None = None
    contains: bool | None = None
    outcome: PairOutcome | None = None
    """Against the baseline; ``None`` for the baseline itself or without win-rates."""
    judged: bool = False
    verdicts: list[str | None] = []
    samples: int = 0
    """Candidates the strategy used: 1 for ``single``, N for the others, fewer for an
    early-stopping vote that stopped (then ``stop_reason`` says why)."""
    stop_reason: str | None = None
    candidate_tokens: int = 0
    """Tokens of the candidates used (their reported total tokens)."""
    decision_tokens: int = 0
    """Tokens of the decision calls (fusor / judge)."""
    winrate_tokens: int = 0
    """Tokens of judging this answer against the baseline's (a cost of the evaluation, not
    of the strategy)."""

    @property
    def tokens(self) -> int:
        """What the strategy cost: candidate and decision tokens."""
        return self.candidate_tokens + self.decision_tokens


class ItemResult(BaseModel):
    """Everything evaluated for one item (a line of ``answers.jsonl``)."""

    id: str
    prompt: str
    references: list[str]
    candidates: list[CandidateRecord]
    answers: list[AnswerRecord]
    oracle: dict[int, dict[str, bool]]
    """For each N: whether any of the first N candidates is right (exact / contains)."""
    votes: dict[str, list[AnswerRecord]] = Field(default_factory=dict, exclude=True)
    """A vote strategy's answer at every depth 1..max(N), for the budget rows (not written:
    the chosen depth's answers are in ``answers``)."""


class StrategyScore(BaseModel):
    """One row of the result table: a strategy at one N."""

    strategy: str
    n: int
    items: int
    answered: int
    with_reference: int
    exact: float | None
    contains: float | None
    wins: int = 0
    ties: int = 0
    losses: int = 0
    win_rate: float | None = None
    judged: int = 0
    """Comparisons that needed the judge (the rest were identical or missing answers)."""
    invalid_verdicts: int = 0
    """Judge verdicts that could not be parsed (they count towards ties)."""
    fallbacks: int = 0
    """Decisions made by the fallback selector after the judge/fusor failed."""
    samples: float | None = None
    """Mean candidates used per item."""
    tokens: float | None = None
    """Mean tokens per item: the candidates used and the decision calls."""
    candidate_tokens: int = 0
    decision_tokens: int = 0
    winrate_tokens: int = 0
    budget: float | None = None
    """Budget rows: the mean tokens per item of the fusion row they are held to."""
    capped: bool = False
    """Budget rows: the depth was cut by the candidate pool (``max(N)``), not the budget."""


@dataclass(frozen=True, kw_only=True)
class BudgetMatch:
    """How deep a vote can go on a fusion row's tokens (:func:`match_budget`)."""

    samples: int
    """N': the depth chosen."""
    tokens: float
    """Mean tokens per item of the first N' candidates."""
    budget: float
    """Mean tokens per item of the fusion row (candidates and fusor)."""
    capped: bool
    """N' is the pool's depth, and one more candidate of mean size would still fit."""


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def match_budget(items: Sequence[ItemResult], strategy: str, n: int) -> BudgetMatch:
    """The largest depth N' whose mean candidate tokens per item (the first N' candidates'
    ``tokens``) are at most ``strategy`` @ ``n``'s mean tokens per item (candidates and
    decision), over ``items``. N' is at least ``n`` (the fusion row used the first ``n``
    candidates, and more) and at most the depth of the candidate pool."""
    records = [a for it in items for a in it.answers if a.strategy == strategy and a.n == n]
    if not records:
        msg = f"no answers of {strategy}@{n} to match a budget to"
        raise ValueError(msg)
    budget = sum(a.tokens for a in records) / len(records)
    depth = min(len(it.candidates) for it in items)
    spent = [
        sum(sum(c.tokens for c in it.candidates[:d]) for it in items) / len(items)
        for d in range(1, depth + 1)
    ]
    affordable = [d for d in range(1, depth + 1) if spent[d - 1] <= budget]
    samples = max(affordable, default=1)
    used = spent[samples - 1]
    capped = samples == depth and budget - used >= used / depth
    return BudgetMatch(samples=samples, tokens=used, budget=budget, capped=capped)


@dataclass
class EvalReport:
    """What an evaluation produced."""

    scores: list[StrategyScore] = field(default_factory=list)
    items: list[ItemResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    """Items that could not be evaluated at all: id, reason."""
    stats: JobStats = field(default_factory=JobStats)
    config: dict[str, Any] = field(default_factory=dict)


def aggregate(
    items: Sequence[ItemResult],
    points: Sequence[tuple[str, int]],
    ns: Sequence[int],
    *,
    budgets: Mapping[tuple[str, int], BudgetMatch] | None = None,
) -> list[StrategyScore]:
    """The result table: one row per (strategy, N), then the oracle rows. ``budgets``: the
    budget rows' matches, by (strategy, N)."""
    scores: list[StrategyScore] = []
    for name, n in points:
        records = [a for it in items for a in it.answers if a.strategy == name and a.n == n]
        referenced = [a for a in records if a.exact is not None]
        wins = sum(a.outcome == "win" for a in records)
        ties = sum(a.outcome == "tie" for a in records)
        losses = sum(a.outcome == "loss" for a in records)
        scores.append(
            StrategyScore(
                strategy=name,
                n=n,
                items=len(records),
                answered=sum(a.text is not None for a in records),
                with_reference=len(referenced),
                exact=(
                    sum(bool(a.exact) for a in referenced) / len(referenced) if referenced else None
                ),
                contains=(
                    sum(bool(a.contains) for a in referenced) / len(referenced)
                    if referenced
                    else None
                ),
                wins=wins,
                ties=ties,
                losses=losses,
                win_rate=win_rate(wins, ties, losses),
                judged=sum(a.judged for a in records),
                invalid_verdicts=sum(
                    sum(v is None for v in a.verdicts) for a in records if a.judged
                ),
                fallbacks=sum(a.fallback for a in records),
                samples=_mean([a.samples for a in records]),
                tokens=_mean([a.tokens for a in records]),
                candidate_tokens=sum(a.candidate_tokens for a in records),
                decision_tokens=sum(a.decision_tokens for a in records),
                winrate_tokens=sum(a.winrate_tokens for a in records),
            )
        )
        match = (budgets or {}).get((name, n))
        if match is not None:
            scores[-1].budget, scores[-1].capped = match.budget, match.capped
    referenced_items = [it for it in items if it.references]
    if referenced_items:
        for n in sorted(set(ns)):
            total = len(referenced_items)
            scores.append(
                StrategyScore(
                    strategy="oracle",
                    n=n,
                    items=total,
                    answered=total,
                    with_reference=total,
                    exact=sum(it.oracle[n]["exact"] for it in referenced_items) / total,
                    contains=sum(it.oracle[n]["contains"] for it in referenced_items) / total,
                )
            )
    return scores


# --- files ------------------------------------------------------------------------------------

CSV_FIELDS = list(StrategyScore.model_fields)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _samples(s: StrategyScore) -> str:
    if s.samples is None:
        return ""
    text = f"{s.samples:.0f}" if s.samples == int(s.samples) else f"{s.samples:.2f}"
    return f"{text} (capped)" if s.capped else text


def table_rows(scores: Sequence[StrategyScore]) -> list[list[str]]:
    """The result table as text cells (the terminal table and ``eval.md``)."""
    rows = []
    for s in scores:
        wtl = f"{s.wins}/{s.ties}/{s.losses}" if s.win_rate is not None else ""
        rows.append(
            [
                s.strategy,
                str(s.n),
                _pct(s.exact),
                _pct(s.contains),
                _pct(s.win_rate),
                wtl,
                f"{2 * s.judged - s.invalid_verdicts}/{2 * s.judged}"
                if s.win_rate is not None
                else "",
                str(s.fallbacks) if s.strategy != "oracle" else "",
                _samples(s),
                "" if s.tokens is None else f"{s.tokens:.0f}",
            ]
        )
    return rows


TABLE_HEADER = [
    "strategy",
    "N",
    "exact",
    "contains",
    "win-rate",
    "W/T/L",
    "verdicts",
    "fallback",
    "samples",
    "tokens/item",
]
"""Columns of the result table: exact-match and contains-answer accuracy, win-rate against
the baseline with wins/ties/losses, judge verdicts parsed / asked (two per judged
comparison; identical answers are not judged), decisions taken by the fallback selector,
mean candidates used per item (``(capped)``: a budget row cut by the pool's depth) and
mean tokens per item (candidates used and decision calls; win-rate judging excluded)."""


def markdown_table(scores: Sequence[StrategyScore]) -> str:
    """The result table in Markdown."""
    lines = [
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join("---" for _ in TABLE_HEADER) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(scores)]
    return "\n".join(lines) + "\n"


def write_results(report: EvalReport, out: Path) -> dict[str, Path]:
    """``eval.json`` (config, table, counters), ``eval.csv`` and ``eval.md`` (the table)
    and ``answers.jsonl`` (every item's candidates and answers) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "eval.json",
        "csv": out / "eval.csv",
        "markdown": out / "eval.md",
        "answers": out / "answers.jsonl",
    }
    paths["markdown"].write_text(markdown_table(report.scores))
    payload = {
        "config": report.config,
        "scores": [s.model_dump(mode="json") for s in report.scores],
        "failed_items": [{"id": i, "reason": r} for i, r in report.failed],
        "stats": report.stats.as_dict(),
    }
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for score in report.scores:
            writer.writerow(score.model_dump(mode="json"))
    with paths["answers"].open("w", encoding="utf-8") as handle:
        for item in report.items:
            handle.write(item.model_dump_json() + "\n")
    return paths


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


def plot_scores(
    scores: Sequence[StrategyScore], path: Path, *, baseline: str, title: str | None = None
) -> Path:
    """A PNG of quality against N per strategy: contains-answer accuracy (when there are
    references) and win-rate against the baseline (when judged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({s.n for s in scores})
    panels: list[tuple[str, str]] = []
    if any(s.contains is not None for s in scores):
        panels.append(("contains", "accuracy (contains answer)"))
    if any(s.win_rate is not None for s in scores):
        panels.append(("win_rate", f"win-rate vs {baseline}"))
    if not panels:
        panels.append(("contains", "accuracy (contains answer)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels, strict=True):
        names = list(dict.fromkeys(s.strategy for s in scores))
        for name in names:
            rows = sorted((s for s in scores if s.strategy == name), key=lambda s: s.n)
            points = [(s.n, getattr(s, metric)) for s in rows if getattr(s, metric) is not None]
            if not points:
                continue
            color, line, marker = _STYLE.get(name, (None, "-", "o"))
            if name == "single":
                value = points[0][1]
                ax.axhline(value, color=color, linestyle="--", linewidth=1.2, label=f"{name}")
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, color=color, linestyle=line, marker=marker, label=name)
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
