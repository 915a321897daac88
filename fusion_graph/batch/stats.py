"""The statistics of an evaluation: percentile bootstrap intervals over items, the exact
McNemar test of two strategies on the same items, and Spearman's rank correlation.

One resampling core (:func:`bootstrap`) serves every interval: a strategy's accuracy (the
mean of 1/0 per item), its win-rate (1 / 0.5 / 0 per item), the paired difference of two
strategies (:func:`paired_bootstrap`: the mean of ``second - first`` per item) and a ratio
of sums such as a judge's pairwise accuracy (credit and pairs per item). Items are drawn
with replacement :data:`RESAMPLES` times from a ``random.Random`` seeded with :data:`SEED`
(after sorting the per-item values, so the interval depends on the values, not on the
order of the items): a rerun gives the same interval, and two rows with the same outcomes
get the same one. The interval is the percentile one (the 2.5th and 97.5th percentiles of
the resampled statistic at 95 %). Pure Python: no numpy needed.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

RESAMPLES = 2_000
"""Bootstrap resamples per interval (enough for 95 % percentile bounds; each costs one pass
over the items)."""

LEVEL = 0.95
"""Coverage of the intervals."""

SEED = 0
"""Seed of every bootstrap: the same outcomes give the same interval on every run."""


@dataclass(frozen=True, kw_only=True)
class Interval:
    """A statistic over items and its percentile bootstrap interval."""

    mean: float
    """The statistic on the items themselves: a mean, or a ratio of sums when weighted."""
    low: float
    high: float
    level: float
    items: int
    resamples: int


PairedDifference = Interval
"""The mean paired difference of two strategies and its interval (:func:`paired_bootstrap`)."""


def _checked(level: float, resamples: int) -> None:
    if not 0 < level < 1 or resamples < 1:
        msg = f"level must be in (0, 1) and resamples positive, got {level!r}, {resamples!r}"
        raise ValueError(msg)


@functools.lru_cache(maxsize=1024)
def _resampled(
    pairs: tuple[tuple[float, float], ...], resamples: int, seed: int
) -> tuple[float, ...]:
    """The statistic ``sum(values) / sum(weights)`` on ``resamples`` draws of the items
    with replacement, sorted. Unit weights take a quicker path that draws the same items
    (``choices`` consumes the generator the same way for any population of this size)."""
    rng = random.Random(seed)
    count = len(pairs)
    if all(w == 1.0 for _, w in pairs):
        values = [v for v, _ in pairs]
        means = [sum(rng.choices(values, k=count)) / count for _ in range(resamples)]
    else:
        means = []
        for _ in range(resamples):
            drawn = rng.choices(pairs, k=count)
            means.append(sum(v for v, _ in drawn) / sum(w for _, w in drawn))
    return tuple(sorted(means))


def bootstrap(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> Interval:
    """``sum(values) / sum(weights)`` over items (the mean with no ``weights``) and its
    percentile bootstrap interval at ``level``: items resampled with replacement
    ``resamples`` times, seeded.

    Args:
        values: One number per item (1/0 for right/wrong, 1/0.5/0 for win/tie/loss, a
            paired difference, or an item's summed credit).
        weights: Positive, one per item: the statistic is then a ratio of sums (e.g. a
            judge's credit over the pairs it was judged on).

    Example:
        >>> bootstrap([1, 1, 1, 0]).mean
        0.75
    """
    if not values:
        msg = "bootstrap needs at least one item"
        raise ValueError(msg)
    _checked(level, resamples)
    if weights is None:
        weights = [1.0] * len(values)
    if len(weights) != len(values) or any(not w > 0 for w in weights):
        msg = f"one positive weight per value is needed, got {list(weights)!r}"
        raise ValueError(msg)
    pairs = tuple(sorted((float(v), float(w)) for v, w in zip(values, weights, strict=True)))
    means = _resampled(pairs, resamples, seed)
    tail = (1 - level) / 2
    low = means[min(resamples - 1, int(tail * resamples))]
    high = means[min(resamples - 1, max(0, math.ceil((1 - tail) * resamples) - 1))]
    estimate = sum(v for v, _ in pairs) / sum(w for _, w in pairs)
    # The percentiles of a resampled mean bracket the mean; guard float rounding.
    return Interval(
        mean=estimate,
        low=min(low, estimate),
        high=max(high, estimate),
        level=level,
        items=len(pairs),
        resamples=resamples,
    )


def paired_bootstrap(
    first: Sequence[float],
    second: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> PairedDifference:
    """The mean paired difference ``second[i] - first[i]`` (e.g. 1/0 correctness of two
    strategies on the same items) and its percentile bootstrap interval at ``level``
    (:func:`bootstrap` of the differences: items are resampled, pairs kept together)."""
    if len(first) != len(second) or not first:
        msg = f"two equally long, non-empty sequences are needed, got {len(first)}, {len(second)}"
        raise ValueError(msg)
    diffs = [float(b) - float(a) for a, b in zip(first, second, strict=True)]
    return bootstrap(diffs, resamples=resamples, level=level, seed=seed)


def mcnemar_exact(first_only: int, second_only: int) -> float:
    """The two-sided exact McNemar p-value (a binomial sign test on the discordant items):
    under "both strategies are equally good", each of the ``first_only + second_only``
    items that exactly one of them gets right is a fair coin, so the p-value is
    ``min(1, 2 * P(X <= min(first_only, second_only)))`` for ``X ~ Binomial(b + c, 1/2)``;
    1.0 without discordant items.

    Example:
        >>> round(mcnemar_exact(5, 1), 4)  # 2 * (1 + 6) / 64
        0.2188
    """
    if first_only < 0 or second_only < 0:
        msg = f"counts must be non-negative, got {first_only}, {second_only}"
        raise ValueError(msg)
    total = first_only + second_only
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(first_only, second_only) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**total)))


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the ranks, ties sharing their
    mean rank (with a 1/0 ``y``: the point-biserial correlation of the score's ranks with
    correctness); ``None`` when either side is constant or with fewer than two points.

    Example:
        >>> spearman([1, 2, 3], [0, 1, 1])
        0.8660254037844387
    """
    if len(x) != len(y):
        msg = f"two equally long sequences are needed, got {len(x)}, {len(y)}"
        raise ValueError(msg)
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)
