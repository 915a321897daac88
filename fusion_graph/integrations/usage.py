"""Token usage of a reply, and of one multi-sample response shared out over its samples."""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import AIMessage
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata

__all__ = ["choice_tokens", "shares", "split_usage", "token_usage"]


def token_usage(
    input_tokens: int, output_tokens: int, *, cache_read: int | None = None
) -> UsageMetadata:
    """A reply's ``usage_metadata``; ``cache_read`` (prompt tokens served from a cache) is
    recorded when given."""
    usage = UsageMetadata(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
    )
    if cache_read is not None:
        usage["input_token_details"] = InputTokenDetails(cache_read=cache_read)
    return usage


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


def choice_tokens(
    total: int, texts: Sequence[str], finish: Sequence[str | None], max_tokens: int | None
) -> list[int]:
    """Completion tokens per choice when the server reports only their sum: a choice cut at
    ``max_tokens`` produced exactly that many; the rest is split by text length."""
    counts = [0] * len(texts)
    rest = total
    open_ = []
    for i, reason in enumerate(finish):
        if reason == "length" and max_tokens is not None and rest >= max_tokens:
            counts[i] = max_tokens
            rest -= max_tokens
        else:
            open_.append(i)
    for i, part in zip(open_, shares(rest, [len(texts[i]) + 1 for i in open_]), strict=True):
        counts[i] = part
    return counts


def split_usage(
    usage: UsageMetadata | None,
    messages: Sequence[AIMessage],
    finish: Sequence[str | None],
    max_tokens: int | None,
    exact_output: Sequence[int | None],
) -> list[UsageMetadata | None]:
    """One usage per choice of a single ``n=k`` response; the shares add up to the response's
    usage (prompt tokens split evenly, completion tokens as in :func:`choice_tokens`, or
    ``exact_output`` when it knows every choice's count)."""
    if usage is None:
        return [None] * len(messages)
    k = len(messages)
    inputs = shares(usage["input_tokens"], [1] * k)
    if all(x is not None for x in exact_output):
        outputs = [int(x or 0) for x in exact_output]
    else:
        texts = [m.text for m in messages]
        outputs = choice_tokens(usage["output_tokens"], texts, finish, max_tokens)
    cached = (usage.get("input_token_details") or {}).get("cache_read")
    cached_shares = shares(cached, [1] * k) if cached is not None else None
    return [
        token_usage(
            inputs[i],
            outputs[i],
            cache_read=cached_shares[i] if cached_shares is not None else None,
        )
        for i in range(k)
    ]
