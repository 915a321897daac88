"""FusioN against the best BoN on the same items: at each N, the paired difference of their
accuracies with its bootstrap interval, and the exact McNemar test on the items exactly one
of them gets right.

The best BoN at N is the Best-of-N strategy (a judge, a pairwise tournament, the fixed
vote, a reward function; not the early-stopping or same-budget votes) with the highest
accuracy at that N, ties to the first in the evaluation's order. It is picked on the same
items it is then compared on, which favours BoN: an interval that still excludes 0 is
conservative for FusioN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fusion_graph.batch.records import AnswerRecord, ItemResult, StrategyScore
from fusion_graph.batch.stats import mcnemar_exact, paired_bootstrap

Metric = Literal["exact", "contains", "numeric"]
"""An accuracy of :mod:`~fusion_graph.batch.metrics`:

* ``"exact"``: the extracted answer equals a reference.
* ``"contains"``: a reference appears in it as whole words.
* ``"numeric"``: its last number equals a numeric reference (items with one only).
"""

PAIRED_METRIC: Metric = "contains"
"""The accuracy FusioN and BoN are compared on (the plot's, too)."""


@dataclass(frozen=True, kw_only=True)
class PairedTest:
    """FusioN@N against the best BoN@N on the items both were scored on."""

    n: int
    fusion: str
    bon: str
    metric: Metric
    items: int
    fusion_accuracy: float
    bon_accuracy: float
    difference: float
    """``fusion_accuracy - bon_accuracy``."""
    low: float
    high: float
    """The difference's percentile bootstrap interval (items resampled, pairs kept)."""
    level: float
    fusion_only: int
    """Items FusioN gets right and BoN wrong."""
    bon_only: int
    """Items BoN gets right and FusioN wrong."""
    p_value: float
    """Exact McNemar (two-sided binomial sign test on the discordant items)."""

    def line(self) -> str:
        """``N=4: fusion - majority-vote = +7.5 pts [+0.0, +15.0], discordant 5/1,
        McNemar p = 0.22``."""
        return (
            f"N={self.n}: {self.fusion} - {self.bon} = {100 * self.difference:+.1f} pts "
            f"[{100 * self.low:+.1f}, {100 * self.high:+.1f}], "
            f"discordant {self.fusion_only}/{self.bon_only}, McNemar p = {self.p_value:.2g}"
        )


def correct(answer: AnswerRecord, metric: Metric) -> bool | None:
    """Whether ``answer`` is right under ``metric`` (``None``: not scored so)."""
    value: bool | None = getattr(answer, metric)
    return value


def best_bon(
    scores: Sequence[StrategyScore], bon: Sequence[str], n: int, metric: Metric
) -> str | None:
    """The BoN strategy among ``bon`` with the highest ``metric`` accuracy at ``n`` (ties to
    the first in ``bon``); ``None`` when none was scored."""
    rows = {s.strategy: getattr(s, metric) for s in scores if s.n == n and s.strategy in bon}
    scored = [(name, rows[name]) for name in bon if rows.get(name) is not None]
    if not scored:
        return None
    return max(scored, key=lambda pair: pair[1])[0]


def paired_test(
    items: Sequence[ItemResult], fusion: str, bon: str, n: int, metric: Metric
) -> PairedTest | None:
    """``fusion`` against ``bon`` at ``n`` on the items where both answers are scored under
    ``metric``; ``None`` when there are none."""
    pairs: list[tuple[bool, bool]] = []
    for it in items:
        by_key = {(a.strategy, a.n): a for a in it.answers}
        mine, theirs = by_key.get((fusion, n)), by_key.get((bon, n))
        if mine is None or theirs is None:
            continue
        a, b = correct(mine, metric), correct(theirs, metric)
        if a is not None and b is not None:
            pairs.append((a, b))
    if not pairs:
        return None
    diff = paired_bootstrap([float(b) for _, b in pairs], [float(a) for a, _ in pairs])
    fusion_only = sum(a and not b for a, b in pairs)
    bon_only = sum(b and not a for a, b in pairs)
    return PairedTest(
        n=n,
        fusion=fusion,
        bon=bon,
        metric=metric,
        items=len(pairs),
        fusion_accuracy=sum(a for a, _ in pairs) / len(pairs),
        bon_accuracy=sum(b for _, b in pairs) / len(pairs),
        difference=diff.mean,
        low=diff.low,
        high=diff.high,
        level=diff.level,
        fusion_only=fusion_only,
        bon_only=bon_only,
        p_value=mcnemar_exact(fusion_only, bon_only),
    )


def fusion_vs_best_bon(
    items: Sequence[ItemResult],
    scores: Sequence[StrategyScore],
    *,
    fusion: Sequence[str],
    bon: Sequence[str],
    ns: Sequence[int],
    metric: Metric = PAIRED_METRIC,
) -> list[PairedTest]:
    """For each fusion strategy and N: :func:`paired_test` against :func:`best_bon`."""
    tests = []
    for name in fusion:
        for n in sorted(set(ns)):
            best = best_bon(scores, bon, n, metric)
            test = paired_test(items, name, best, n, metric) if best is not None else None
            if test is not None:
                tests.append(test)
    return tests
