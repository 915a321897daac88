"""The results of an evaluation: the table (one row per strategy and N, then the oracle
rows: the share of items where any of the first N candidates is right), FusioN against the
best BoN, the judges' quality, and the files (``eval.json``, ``eval.csv``, ``eval.md``,
``answers.jsonl``, a PNG plot). The records themselves are in
:mod:`fusion_graph.batch.records`.

Every accuracy (exact, contains, numeric) and win-rate comes with its bootstrap 95 %
interval over items (:func:`~fusion_graph.batch.stats.bootstrap`: ``*_low`` / ``*_high``
in the files, ``70.0% [55.0, 82.5]`` in the table). Each row also says what the strategy
cost per item: the candidates it used (``samples``) and its tokens (``tokens``: the used
candidates' reported total tokens plus its decision calls', win-rate judging excluded).
:func:`match_budget` finds how deep a vote can go on a fusion strategy's tokens (the
``majority-vote@fusion-budget`` rows).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fusion_graph.batch.judging import JudgeQuality
from fusion_graph.batch.metrics import win_rate
from fusion_graph.batch.models import JobStats
from fusion_graph.batch.paired import PAIRED_METRIC, PairedTest
from fusion_graph.batch.plot import plot_scores
from fusion_graph.batch.records import (
    AnswerRecord,
    CandidateRecord,
    CandidateScore,
    ItemResult,
    StrategyScore,
)
from fusion_graph.batch.stats import LEVEL, RESAMPLES, SEED, bootstrap

__all__ = [
    "CSV_FIELDS",
    "TABLE_HEADER",
    "AnswerRecord",
    "BudgetMatch",
    "CandidateRecord",
    "CandidateScore",
    "EvalReport",
    "ItemResult",
    "StrategyScore",
    "aggregate",
    "markdown_report",
    "markdown_table",
    "match_budget",
    "plot_scores",
    "summary_lines",
    "table_rows",
    "write_results",
]


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
    paired: list[PairedTest] = field(default_factory=list)
    """Each fusion strategy against the best BoN at each N (:mod:`~fusion_graph.batch.paired`)."""
    judges: list[JudgeQuality] = field(default_factory=list)
    """How the judges did (:mod:`~fusion_graph.batch.judging`)."""


def _accuracy(
    values: Sequence[bool | None],
) -> tuple[float | None, float | None, float | None, int]:
    """Accuracy over the scored values, its interval, and how many were scored."""
    scored = [float(v) for v in values if v is not None]
    if not scored:
        return None, None, None, 0
    interval = bootstrap(scored)
    return interval.mean, interval.low, interval.high, len(scored)


_WIN_VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def _score_row(
    name: str, n: int, records: Sequence[AnswerRecord], oracle: Sequence[ItemResult] = ()
) -> StrategyScore:
    """A row's accuracies with their intervals (the oracle's from ``oracle`` items)."""
    if oracle:
        marks = [it.oracle[n] for it in oracle]
        exact, contains, numeric = (
            [m.get(key) for m in marks] for key in ("exact", "contains", "numeric")
        )
        referenced = len(oracle)
    else:
        scored = [a for a in records if a.exact is not None]
        exact = [a.exact for a in scored]
        contains = [a.contains for a in scored]
        numeric = [a.numeric for a in scored]
        referenced = len(scored)
    e, e_low, e_high, _ = _accuracy(exact)
    c, c_low, c_high, _ = _accuracy(contains)
    m, m_low, m_high, with_numeric = _accuracy(numeric)
    outcomes = [_WIN_VALUE[a.outcome] for a in records if a.outcome is not None]
    rate = bootstrap(outcomes) if outcomes else None
    wins, ties, losses = (sum(a.outcome == k for a in records) for k in ("win", "tie", "loss"))
    return StrategyScore(
        strategy=name,
        n=n,
        items=len(oracle) if oracle else len(records),
        answered=len(oracle) if oracle else sum(a.text is not None for a in records),
        with_reference=referenced,
        exact=e,
        exact_low=e_low,
        exact_high=e_high,
        contains=c,
        contains_low=c_low,
        contains_high=c_high,
        numeric=m,
        numeric_low=m_low,
        numeric_high=m_high,
        with_numeric_reference=with_numeric,
        wins=wins,
        ties=ties,
        losses=losses,
        win_rate=win_rate(wins, ties, losses),
        win_rate_low=rate.low if rate else None,
        win_rate_high=rate.high if rate else None,
    )


def aggregate(
    items: Sequence[ItemResult],
    points: Sequence[tuple[str, int]],
    ns: Sequence[int],
    *,
    budgets: Mapping[tuple[str, int], BudgetMatch] | None = None,
) -> list[StrategyScore]:
    """The result table: one row per (strategy, N), then the oracle rows, each accuracy and
    win-rate with its bootstrap interval over items. ``budgets``: the budget rows'
    matches, by (strategy, N)."""
    scores: list[StrategyScore] = []
    for name, n in points:
        records = [a for it in items for a in it.answers if a.strategy == name and a.n == n]
        row = _score_row(name, n, records)
        row.judged = sum(a.judged for a in records)
        row.invalid_verdicts = sum(sum(v is None for v in a.verdicts) for a in records if a.judged)
        row.fallbacks = sum(a.fallback for a in records)
        row.samples = _mean([a.samples for a in records])
        row.tokens = _mean([a.tokens for a in records])
        row.candidate_tokens = sum(a.candidate_tokens for a in records)
        row.decision_tokens = sum(a.decision_tokens for a in records)
        row.winrate_tokens = sum(a.winrate_tokens for a in records)
        match = (budgets or {}).get((name, n))
        if match is not None:
            row.budget, row.capped = match.budget, match.capped
        scores.append(row)
    referenced_items = [it for it in items if it.references]
    if referenced_items:
        for n in sorted(set(ns)):
            scores.append(_score_row("oracle", n, [], referenced_items))
    return scores


# --- text ---------------------------------------------------------------------------------------

CSV_FIELDS = list(StrategyScore.model_fields)


def _pct(value: float | None, low: float | None = None, high: float | None = None) -> str:
    if value is None:
        return ""
    if low is None or high is None:
        return f"{100 * value:.1f}%"
    return f"{100 * value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


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
                _pct(s.exact, s.exact_low, s.exact_high),
                _pct(s.contains, s.contains_low, s.contains_high),
                _pct(s.numeric, s.numeric_low, s.numeric_high),
                _pct(s.win_rate, s.win_rate_low, s.win_rate_high),
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
    "numeric",
    "win-rate",
    "W/T/L",
    "verdicts",
    "fallback",
    "samples",
    "tokens/item",
]
"""Columns of the result table: exact-match, contains-answer and numeric accuracy (numeric
over the items with a numeric reference; empty without any) and the win-rate against the
baseline, each with its bootstrap 95 % interval in brackets, in percent; wins/ties/losses,
win-rate judge verdicts parsed / asked (two per judged comparison; identical answers are
not judged), decisions taken by the fallback selector, mean candidates used per item
(``(capped)``: a budget row cut by the pool's depth) and mean tokens per item (candidates
used and decision calls; win-rate judging excluded)."""


def markdown_table(scores: Sequence[StrategyScore]) -> str:
    """The result table in Markdown."""
    lines = [
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join("---" for _ in TABLE_HEADER) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(scores)]
    return "\n".join(lines) + "\n"


def summary_lines(report: EvalReport) -> list[str]:
    """What follows the table: how to read its intervals, FusioN against the best BoN at
    each N, then the judges."""
    lines: list[str] = []
    if any(s.contains_low is not None or s.win_rate_low is not None for s in report.scores):
        numeric = max((s.with_numeric_reference for s in report.scores), default=0)
        lines.append(
            f"[low, high]: {100 * LEVEL:.0f}% bootstrap interval over items ({RESAMPLES} "
            f"resamples, seed {SEED}); numeric accuracy over the {numeric} items with a "
            "numeric reference."
        )
    if report.paired:
        first = report.paired[0]
        lines.append(
            f"FusioN vs the best BoN at each N ({first.metric} accuracy, paired over "
            f"{first.items} items, {100 * first.level:.0f}% bootstrap interval, exact McNemar):"
        )
        lines += [f"  {test.line()}" for test in report.paired]
    if report.judges:
        lines.append("Judges (verdicts read / asked; pointwise: right vs wrong candidates):")
        lines += [f"  {line}" for judge in report.judges for line in judge.lines()]
    return lines


def markdown_report(report: EvalReport) -> str:
    """``eval.md``: the table, then :func:`summary_lines` as a list."""
    text = markdown_table(report.scores)
    extra = summary_lines(report)
    if extra:
        items = []
        for line in extra:
            depth = (len(line) - len(line.lstrip(" "))) // 2
            items.append(f"{'  ' * depth}- {line.strip()}")
        text += "\n" + "\n".join(items) + "\n"
    return text


# --- files --------------------------------------------------------------------------------------


def write_results(report: EvalReport, out: Path) -> dict[str, Path]:
    """``eval.json`` (config, table, paired tests, judge quality, counters), ``eval.csv``
    (the table), ``eval.md`` (the table and the summary lines) and ``answers.jsonl``
    (every item's candidates and answers) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "eval.json",
        "csv": out / "eval.csv",
        "markdown": out / "eval.md",
        "answers": out / "answers.jsonl",
    }
    paths["markdown"].write_text(markdown_report(report))
    payload = {
        "config": report.config,
        "scores": [s.model_dump(mode="json") for s in report.scores],
        "paired_tests": {
            "metric": PAIRED_METRIC,
            "tests": [asdict(test) for test in report.paired],
        },
        "judge_quality": {judge.strategy: judge.as_dict() for judge in report.judges},
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
