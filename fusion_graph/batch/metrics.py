"""Scoring an evaluation's answers against references (three matchers, never a judge),
the answer extractors, and the pairwise win-rate (:func:`judge_pair`: an LLM judge in both
orders, the votes combined by :func:`~fusion_graph.nodes.judges.combine_verdicts`).

Every matcher first takes the scored answer out of the reply with the extractor
(:data:`EXTRACTORS`, default ``final``: the ``\\boxed{}`` / ``####`` / "answer is" part when
present and not empty, else the whole reply; or any ``module:function``), then:

* **exact** (:func:`exact_match`): the extracted answer, normalised, equals a reference,
  normalised. :func:`normalize` lower-cases, drops thousands separators (``1,000`` ->
  ``1000``), replaces punctuation and ``_`` by spaces, drops the articles a / an / the and
  collapses whitespace: ``"The  Eiffel-Tower!"`` == ``"eiffel tower"``; ``"Paris,
  France"`` != ``"Paris"``; an empty answer never matches.
* **contains** (:func:`contains_answer`): a normalised reference occurs in the normalised
  extracted answer as whole words (``"It is Paris."`` contains ``Paris``; ``"123"`` does
  not contain ``12``). Lenient: a reply listing several answers gets credit.
* **numeric** (:func:`numeric_match`): only for items with a numeric reference (a
  reference that is one number: optional sign, digits with optional thousands commas,
  optional decimals, e.g. ``4``, ``-3``, ``1,000``, ``2.50``); other references are
  ignored, and an item without a numeric reference has no numeric score (``None``). The
  answer is the *last* number in the extracted answer (:func:`last_number`: thousands
  separators dropped, a minus sign only when it does not follow a letter or digit, so
  ``5-7`` ends in ``7``), compared by value: ``"4.0"`` == ``"4"``, ``"1,000"`` ==
  ``"1000"``, ``"-3"`` == ``"-3"``, ``"2 or 3"`` != ``"2"``. Number words (``four``) are not
  numbers here (``contains`` matches them when a reference spells them).

Intervals and tests on these scores are in :mod:`fusion_graph.batch.stats`
(:func:`paired_bootstrap` is re-exported here).
"""

from __future__ import annotations

import asyncio
import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig

from fusion_graph.batch.stats import PairedDifference, paired_bootstrap
from fusion_graph.messages import message_text
from fusion_graph.nodes.judges import PairOutcome, combine_verdicts, parse_pairwise_output
from fusion_graph.nodes.select import final_answer
from fusion_graph.nodes.verdicts import PAIRWISE_SCHEMA, constrained_options
from fusion_graph.prompts import PAIRWISE_PROMPT, PromptTemplate, build_pairwise_messages
from fusion_graph.types import Candidate, TokenUsage

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\d+(?:\.\d+)?")
_NUMERIC_REFERENCE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")

__all__ = [
    "EXTRACTORS",
    "Extractor",
    "PairVerdict",
    "PairedDifference",
    "contains_answer",
    "exact_match",
    "final_or_whole",
    "get_extractor",
    "judge_pair",
    "last_number",
    "normalize",
    "numeric_match",
    "numeric_reference",
    "paired_bootstrap",
    "win_rate",
]


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


def last_number(text: str) -> str:
    """The last number in ``text`` (thousands separators dropped; a minus sign counts when
    it does not follow a letter or digit); ``""`` without one. ``"5-7 or 1,000"`` ->
    ``"1000"``."""
    found = _NUMBER.findall(_THOUSANDS.sub("", text.replace("\u2212", "-")))
    return str(found[-1]) if found else ""


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
    "number": last_number,
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


def numeric_reference(reference: str) -> Decimal | None:
    """The value of a reference that is one number (``"4"``, ``"-3"``, ``"1,000"``,
    ``"2.50"``), else ``None``."""
    text = reference.strip()
    if not _NUMERIC_REFERENCE.fullmatch(text):
        return None
    return Decimal(text.replace(",", ""))


def numeric_match(
    answer: str, references: Sequence[str], extract: Extractor = final_or_whole
) -> bool | None:
    """The last number of the extracted answer equals a numeric reference, by value
    (``"4.0"`` == ``"4"``); ``None`` when no reference is a number (the matcher does not
    apply to the item)."""
    values = [v for v in (numeric_reference(r) for r in references) if v is not None]
    if not values:
        return None
    got = last_number(extract(answer))
    try:
        number = Decimal(got)
    except InvalidOperation:
        return False
    return any(number == v for v in values)


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
