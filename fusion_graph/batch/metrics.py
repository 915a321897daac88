"""Scoring an evaluation's answers: normalisation, answer extractors, exact match,
contains-answer, the pairwise win-rate (:func:`judge_pair`: an LLM judge in both
orders, the votes combined by :func:`~fusion_graph.nodes.judges.combine_verdicts`), and a
paired bootstrap interval for the difference of two strategies (:func:`paired_bootstrap`).

Both matches compare after :func:`normalize` (case, punctuation, articles, thousands
separators). The extractor, which takes the scored answer out of a reply, is pluggable
(:data:`EXTRACTORS`, or any ``module:function``).
"""

from __future__ import annotations

import asyncio
import importlib
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig

from fusion_graph.messages import message_text
from fusion_graph.nodes.judges import PairOutcome, combine_verdicts, parse_pairwise_output
from fusion_graph.nodes.select import final_answer
from fusion_graph.nodes.verdicts import PAIRWISE_SCHEMA, constrained_options
from fusion_graph.prompts import PAIRWISE_PROMPT, PromptTemplate, build_pairwise_messages
from fusion_graph.types import Candidate, TokenUsage

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    """Lower case; thousands separators, punctuation and articles (a, an, the) dropped;
    whitespace collapsed. ``"The  Eiffel-Tower!"`` -> ``"eiffel tower"``."""
    text = _THOUSANDS.sub("", text.lower())
    text = _PUNCT.sub(" ", text.replace("_", " "))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _last_number(text: str) -> str:
    found = _NUMBER.findall(_THOUSANDS.sub("", text))
    return found[-1] if found else ""


def _whole(text: str) -> str:
    return text


def final_or_whole(text: str) -> str:
    """:func:`~fusion_graph.nodes.select.final_answer` (the ``\\boxed{}`` / ``####`` /
    "answer is" part, normalised), or the whole reply when that part is empty (e.g. "The
    answer is:" followed by a line break)."""
    found = final_answer(text)
    return found if normalize(found) else text


Extractor = Callable[[str], str]
"""Turns a model's reply into the answer that is scored (and voted on)."""

EXTRACTORS: dict[str, Extractor] = {
    "final": final_or_whole,
    "text": _whole,
    "first-line": _first_line,
    "last-line": _last_line,
    "number": _last_number,
}
"""Built-in extractors: ``final`` (the ``\\boxed{}`` / ``####`` / "answer is" part when
present and not empty, else the whole reply; the default), ``text`` (the whole reply),
``first-line``, ``last-line``, ``number`` (the last number)."""


def get_extractor(name: str) -> Extractor:
    """A built-in extractor by name, or ``package.module:function``."""
    if name in EXTRACTORS:
        return EXTRACTORS[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        msg = (
            f"unknown extractor {name!r}: use one of {', '.join(EXTRACTORS)} or "
            "package.module:function"
        )
        raise ValueError(msg)
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        msg = f"cannot load extractor {name!r}: {exc}"
        raise ValueError(msg) from None
    if not callable(function):
        msg = f"extractor {name!r} is not callable"
        raise ValueError(msg)
    return function  # type: ignore[no-any-return]


def exact_match(
    answer: str, references: Sequence[str], extract: Extractor = final_or_whole
) -> bool:
    """The extracted answer equals a reference (both normalised)."""
    got = normalize(extract(answer))
    return bool(got) and any(got == normalize(r) for r in references)


def contains_answer(
    answer: str, references: Sequence[str], extract: Extractor = final_or_whole
) -> bool:
    """A reference appears, as whole words, in the extracted answer (both normalised)."""
    got = f" {normalize(extract(answer))} "
    return any(normalize(r) and f" {normalize(r)} " in got for r in references)


@dataclass(frozen=True, kw_only=True)
class PairedDifference:
    """The mean of ``second - first`` over paired items, with a bootstrap interval."""

    mean: float
    low: float
    high: float
    level: float
    items: int
    resamples: int


def paired_bootstrap(
    first: Sequence[float],
    second: Sequence[float],
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """The mean paired difference ``second[i] - first[i]`` (e.g. 1/0 correctness of two
    strategies on the same items) and its percentile bootstrap interval at ``level``:
    items resampled with replacement ``resamples`` times, seeded (the same inputs give the
    same interval)."""
    if len(first) != len(second) or not first:
        msg = f"two equally long, non-empty sequences are needed, got {len(first)}, {len(second)}"
        raise ValueError(msg)
    if not 0 < level < 1 or resamples < 1:
        msg = f"level must be in (0, 1) and resamples positive, got {level!r}, {resamples!r}"
        raise ValueError(msg)
    diffs = [float(b) - float(a) for a, b in zip(first, second, strict=True)]
    count = len(diffs)
    rng = random.Random(seed)
    means = sorted(
        sum(diffs[rng.randrange(count)] for _ in range(count)) / count for _ in range(resamples)
    )
    tail = (1 - level) / 2
    low = means[min(resamples - 1, int(tail * resamples))]
    high = means[min(resamples - 1, max(0, math.ceil((1 - tail) * resamples) - 1))]
    return PairedDifference(
        mean=sum(diffs) / count,
        low=low,
        high=high,
        level=level,
        items=count,
        resamples=resamples,
    )


def win_rate(wins: int, ties: int, losses: int) -> float | None:
    """``(wins + ties / 2) / total``; ``None`` with nothing judged."""
    total = wins + ties + losses
    return (wins + ties / 2) / total if total else None


@dataclass(frozen=True, kw_only=True)
class PairVerdict:
    """How a strategy's answer did against the baseline's on one item."""

    outcome: PairOutcome
    judged: bool
    """False when decided without the judge (identical or missing answers)."""
    verdicts: tuple[str | None, str | None] = (None, None)
    usage: TokenUsage | None = None


def _as_candidate(text: str, label: int) -> Candidate:
    return Candidate(index=label, model="answer", message=AIMessage(content=text), text=text)


async def judge_pair(
    judge: Runnable[Any, Any],
    conversation: Sequence[BaseMessage],
    answer: str | None,
    baseline: str | None,
    *,
    config: RunnableConfig | None = None,
    prompt: PromptTemplate = PAIRWISE_PROMPT,
) -> PairVerdict:
    """The strategy's ``answer`` against the ``baseline`` answer, judged in both orders."""
    if answer is None or baseline is None:
        outcome: PairOutcome = (
            "tie" if answer is baseline else ("loss" if answer is None else "win")
        )
        return PairVerdict(outcome=outcome, judged=False)
    if normalize(answer) == normalize(baseline):
        return PairVerdict(outcome="tie", judged=False)
    mine, theirs = _as_candidate(answer, 0), _as_candidate(baseline, 1)
    options = constrained_options(judge, PAIRWISE_SCHEMA, name="pairwise_verdict", logprobs=False)

    async def ask(first: Candidate, second: Candidate) -> tuple[str | None, TokenUsage | None]:
        messages = build_pairwise_messages(prompt, conversation, first, second)
        try:
            reply = await judge.ainvoke(messages, config, **options)
        except Exception:  # an unanswered order counts as no vote
            return None, None
        text = message_text(reply) if isinstance(reply, BaseMessage) else str(reply)
        return parse_pairwise_output(text), TokenUsage.of(reply)

    (forward, u1), (backward, u2) = await asyncio.gather(ask(mine, theirs), ask(theirs, mine))
    return PairVerdict(
        outcome=combine_verdicts(forward, backward),
        judged=True,
        verdicts=(forward, backward),
        usage=TokenUsage.sum([u1, u2]),
    )
