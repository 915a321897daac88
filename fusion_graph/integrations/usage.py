"""Token usage of one multi-sample response, shared out over its samples."""

from __future__ import annotations

from collections.abc import Sequence


def shares(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` into integers that add up to ``total``."""
    if not weights:
        return []
    weight_sum = sum(weights)
    if weight_sum <= 0:
        weights, weight_sum = [1] * len(weights), len(weights)
    exact = [total * w / weight_sum for w in weights]
    parts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts
