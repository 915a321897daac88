"""Best-of-N by an LLM judge: pointwise scores (:class:`LLMJudge`) or a pairwise knockout
tournament (:class:`PairwiseJudge`).

Every judge validates what its model says. An answer that cannot be parsed (or a score
far outside 1-10) leaves that candidate unscored; when no candidate could be scored at
all the judge raises :class:`~fusion_graph.errors.SelectorOutputError`, and the decider's
fallback selector decides instead.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable
from pydantic import BaseModel, Field

from fusion_graph.errors import SelectorOutputError
from fusion_graph.messages import message_text
from fusion_graph.nodes.decide import Selection, SelectionContext, Selector
from fusion_graph.nodes.select import MajorityVote, best_index
from fusion_graph.nodes.verdicts import (
    JUDGE_SCHEMA,
    PAIRWISE_SCHEMA,
    constrained_options,
    expected_score,
)
from fusion_graph.prompts import (
    JUDGE_PROMPT,
    PAIRWISE_PROMPT,
    PromptTemplate,
    build_pairwise_messages,
    build_review_messages,
)
from fusion_graph.runtime import model_name
from fusion_graph.types import Candidate, TokenUsage

# --- pointwise LLM judge -----------------------------------------------------------------

_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)
_SCORE_TEXT = re.compile(r"score\W{0,3}(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\.?\s*$")


class JudgeVerdict(BaseModel):
    """Structured output of :class:`LLMJudge`."""

    score: int = Field(description="Quality of the reply, 1 (useless) to 10 (perfect).")
    rationale: str = Field(default="", description="One sentence explaining the score.")


def _valid_score(value: object) -> float | None:
    """Scores within 0-10 are clamped to 1-10; anything else is not a score."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number) or not 0 <= number <= 10:
        return None
    return max(1.0, number)


def parse_judge_output(text: str) -> tuple[float | None, str | None]:
    """``(score, rationale)`` from a judge's reply: JSON first, then ``score: N``, then a
    bare number. Unparseable or out-of-range answers give ``(None, None)``."""
    for blob in _JSON_OBJECT.findall(text):
        try:
            data = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and "score" in data:
            rationale = data.get("rationale")
            return _valid_score(data["score"]), rationale if isinstance(rationale, str) else None
    for pattern in (_SCORE_TEXT, _BARE_NUMBER):
        found = pattern.search(text)
        if found:
            return _valid_score(found.group(1)), None
    return None, None


Scoring = Literal["expected", "sampled"]
"""How a pointwise verdict becomes a score:

* ``"expected"``: the probability-weighted score from the reply's logprobs (G-Eval),
  where they came back; else the sampled one.
* ``"sampled"``: the digit the judge wrote.
"""


@dataclass(frozen=True, kw_only=True)
class PointwiseVerdict:
    """What the judge said about one candidate, read both ways from the same reply."""

    index: int
    """The candidate's index."""
    sampled: float | None
    """The score it wrote (:func:`parse_judge_output`, or the structured output's);
    ``None``: no valid verdict (then :attr:`expected` is ``None`` too)."""
    expected: float | None = None
    """The score's expectation under its logprobs
    (:func:`~fusion_graph.nodes.verdicts.expected_score`); ``None`` without them."""
    rationale: str | None = None
    usage: TokenUsage | None = None

    def score(self, scoring: Scoring) -> float | None:
        """The score under ``scoring`` (``"expected"`` falls back to the sampled one)."""
        if scoring == "expected" and self.sampled is not None and self.expected is not None:
            return self.expected
        return self.sampled


class LLMJudge(Selector):
    """Best-of-N by an LLM judge that scores each candidate alone (1-10, with a rationale),
    all candidates in parallel. The highest score wins; ties go to the lowest index.

    On backends that enforce a JSON schema (the embedded model, ``langchain_openai`` models:
    OpenAI, vLLM, llama.cpp's server) every verdict is decoded under
    :data:`~fusion_graph.nodes.verdicts.JUDGE_SCHEMA`, and where the reply carries logprobs
    the score is the judge's expected score (G-Eval) rather than the digit it sampled
    (:mod:`~fusion_graph.nodes.verdicts`). Other models' replies are parsed from text.

    Args:
        model: The judge chat model.
        prompt: The judge prompt (default :data:`~fusion_graph.prompts.JUDGE_PROMPT`).
        structured: Ask for structured output (``with_structured_output``) instead of
            parsing JSON from text. Use it with models that call tools reliably.
        constrained: Decode verdicts under the JSON schema (None: where the backend takes
            one; False: never, e.g. for a server that rejects ``response_format``).
        scoring: ``"expected"`` (the probability-weighted score, where logprobs come back)
            or ``"sampled"`` (the digit the judge wrote). None: ``"expected"``.
        logprobs: Ask for logprobs (where the backend reports them) whatever the
            ``scoring``, so both scores are read from each reply (:meth:`verdicts`; the
            eval measures both). None: only when scoring ``"expected"``.

    Example:
        >>> from fusion_graph import LLMJudge, best_of_n
        >>> best = best_of_n(llm, n=4, selector=LLMJudge(judge_llm))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Runnable[Any, Any],
        *,
        prompt: PromptTemplate = JUDGE_PROMPT,
        structured: bool = False,
        constrained: bool | None = None,
        scoring: Scoring | None = None,
        logprobs: bool | None = None,
    ) -> None:
        if not isinstance(model, Runnable):
            msg = f"LLMJudge needs a chat model or Runnable, got {type(model).__name__}"
            raise TypeError(msg)
        if scoring not in (None, "expected", "sampled"):
            msg = f"scoring must be 'expected', 'sampled' or None, not {scoring!r}"
            raise ValueError(msg)
        prompt.check("judge")
        self.model = model
        self.prompt = prompt
        self.structured = structured
        self.scoring = scoring or "expected"
        self.name = f"llm_judge:{model_name(model)}"
        options = (
            constrained_options(
                model,
                JUDGE_SCHEMA,
                name="verdict",
                logprobs=self.scoring == "expected" if logprobs is None else logprobs,
            )
            if constrained is not False and not structured
            else {}
        )
        self.constrained = bool(options)
        self._runnable: Runnable[Any, Any]
        if structured:
            self._runnable = model.with_structured_output(JudgeVerdict, include_raw=True)  # type: ignore[attr-defined]
        else:
            self._runnable = model.bind(**options) if options else model

    async def _judge(self, context: SelectionContext, candidate: Candidate) -> PointwiseVerdict:
        messages = build_review_messages(self.prompt, context.conversation, candidate)
        try:
            reply = await context.ask(
                self._runnable, messages, run_name=f"judge[{candidate.index}]"
            )
        except Exception:  # a failed judge call leaves this candidate unscored
            return PointwiseVerdict(index=candidate.index, sampled=None)
        if self.structured and isinstance(reply, dict):
            parsed, raw = reply.get("parsed"), reply.get("raw")
            if isinstance(parsed, JudgeVerdict):
                return PointwiseVerdict(
                    index=candidate.index,
                    sampled=_valid_score(parsed.score),
                    rationale=parsed.rationale,
                    usage=TokenUsage.of(raw),
                )
            reply = raw
        text = message_text(reply) if isinstance(reply, BaseMessage) else str(reply)
        score, rationale = parse_judge_output(text)
        return PointwiseVerdict(
            index=candidate.index,
            sampled=score,
            expected=expected_score(reply) if score is not None else None,
            rationale=rationale,
            usage=TokenUsage.of(reply),
        )

    async def verdicts(self, context: SelectionContext) -> list[PointwiseVerdict]:
        """The judge's verdict on every candidate (in parallel, index order), both the
        sampled and the expected score of each; never raises (an unanswered or unreadable
        verdict has no score)."""
        return list(await asyncio.gather(*(self._judge(context, c) for c in context.candidates)))

    def selection(self, verdicts: list[PointwiseVerdict]) -> Selection:
        """The highest score under :attr:`scoring` wins (ties to the lowest index).

        Raises:
            SelectorOutputError: no verdict has a score.
        """
        scores = {v.index: score for v in verdicts if (score := v.score(self.scoring)) is not None}
        usage = TokenUsage.sum(v.usage for v in verdicts)
        if not scores:
            msg = (
                f"the judge {model_name(self.model)} gave no valid 1-10 score for any of "
                f"{len(verdicts)} candidates"
            )
            raise SelectorOutputError(msg)
        best = best_index(scores)
        rationale = next(v.rationale for v in verdicts if v.index == best)
        return Selection(
            index=best, score=scores[best], scores=scores, rationale=rationale, usage=usage
        )

    async def select(self, context: SelectionContext) -> Selection:
        return self.selection(await self.verdicts(context))


# --- pairwise knockout -------------------------------------------------------------------

_WINNER_TEXT = re.compile(r"\b(?:winner|better)\W{0,4}(A|B|tie)\b", re.IGNORECASE)
_LONE_VERDICT = re.compile(r"^\W*(A|B|tie)\W*$", re.IGNORECASE)


def parse_pairwise_output(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a pairwise judge's reply; ``None`` if unclear."""
    for blob in _JSON_OBJECT.findall(text):
        try:
            data = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("winner"), str):
            winner = data["winner"].strip().upper()
            return {"A": "A", "B": "B", "TIE": "tie"}.get(winner)
    for pattern in (_WINNER_TEXT, _LONE_VERDICT):
        found = pattern.search(text.strip())
        if found:
            value = found.group(1).upper()
            return "tie" if value == "TIE" else value
    return None


PairOutcome = Literal["win", "tie", "loss"]
"""How the first of two answers did against the second."""


def combine_verdicts(forward: str | None, backward: str | None) -> PairOutcome:
    """The outcome for answer X from a pairwise judge's two verdicts: ``forward`` with X
    shown as A, ``backward`` with X shown as B. X wins with more of the two votes, loses
    with fewer, and ties otherwise (ties, disagreeing orders, unparseable verdicts)."""
    mine = (forward == "A") + (backward == "B")
    theirs = (forward == "B") + (backward == "A")
    if mine > theirs:
        return "win"
    if mine < theirs:
        return "loss"
    return "tie"


@dataclass(frozen=True, kw_only=True)
class Tournament:
    """A knockout tournament as it was played (:meth:`PairwiseJudge.tournament`)."""

    winner: int
    """The index of the last candidate standing."""
    wins: dict[int, float]
    """Matches won, by candidate index."""
    verdicts: list[str | None] = field(default_factory=list)
    """Every verdict asked for, in order (``None``: unanswered or unreadable)."""
    usage: TokenUsage | None = None


class PairwiseJudge(Selector):
    """Best-of-N by a knockout tournament of pairwise comparisons.

    Each pair is judged twice, once in each order, to cancel the judge's position bias:
    a candidate wins its match with more of the two votes; a draw (ties, disagreeing
    orders or unparseable verdicts) goes to the lower index. Matches of a round run in
    parallel; an odd candidate out gets a bye. A candidate's score is its matches won.
    """

    def __init__(
        self,
        model: Runnable[Any, Any],
        *,
        prompt: PromptTemplate = PAIRWISE_PROMPT,
        constrained: bool | None = None,
    ) -> None:
        if not isinstance(model, Runnable):
            msg = f"PairwiseJudge needs a chat model or Runnable, got {type(model).__name__}"
            raise TypeError(msg)
        prompt.check("pairwise")
        self.model = model
        self.prompt = prompt
        self.name = f"pairwise_judge:{model_name(model)}"
        options = (
            constrained_options(model, PAIRWISE_SCHEMA, name="pairwise_verdict", logprobs=False)
            if constrained is not False
            else {}
        )
        self.constrained = bool(options)
        self._runnable: Runnable[Any, Any] = model.bind(**options) if options else model

    async def _verdict(
        self, context: SelectionContext, first: Candidate, second: Candidate
    ) -> tuple[str | None, Any]:
        messages = build_pairwise_messages(self.prompt, context.conversation, first, second)
        try:
            reply = await context.ask(
                self._runnable, messages, run_name=f"pairwise[{first.index}v{second.index}]"
            )
        except Exception:
            return None, None
        text = message_text(reply) if isinstance(reply, BaseMessage) else str(reply)
        return parse_pairwise_output(text), reply

    async def _match(
        self, context: SelectionContext, a: Candidate, b: Candidate
    ) -> tuple[Candidate, list[tuple[str | None, Any]]]:
        forward, backward = await asyncio.gather(
            self._verdict(context, a, b), self._verdict(context, b, a)
        )
        outcome = combine_verdicts(forward[0], backward[0])
        return (b if outcome == "loss" else a), [forward, backward]

    async def tournament(self, context: SelectionContext) -> Tournament:
        """Play the knockout on ``context.candidates``; never raises (see :meth:`selection`)."""
        alive = sorted(context.candidates, key=lambda c: c.index)
        wins = {c.index: 0.0 for c in alive}
        verdicts: list[tuple[str | None, Any]] = []
        while len(alive) > 1:
            pairs = list(zip(alive[::2], alive[1::2], strict=False))
            results = await asyncio.gather(*(self._match(context, a, b) for a, b in pairs))
            survivors = []
            for winner, votes in results:
                wins[winner.index] += 1
                verdicts.extend(votes)
                survivors.append(winner)
            if len(alive) % 2:
                survivors.append(alive[-1])
            alive = sorted(survivors, key=lambda c: c.index)
        return Tournament(
            winner=alive[0].index,
            wins=wins,
            verdicts=[v for v, _ in verdicts],
            usage=TokenUsage.sum(TokenUsage.of(raw) for _, raw in verdicts),
        )

    def selection(self, tournament: Tournament) -> Selection:
        """The tournament's winner, scored by its matches won.

        Raises:
            SelectorOutputError: matches were judged and not one verdict was readable.
        """
        if tournament.verdicts and all(v is None for v in tournament.verdicts):
            msg = f"the pairwise judge {model_name(self.model)} gave no valid verdict in any match"
            raise SelectorOutputError(msg)
        return Selection(
            index=tournament.winner,
            score=tournament.wins[tournament.winner],
            scores=tournament.wins,
            usage=tournament.usage,
        )

    async def select(self, context: SelectionContext) -> Selection:
        return self.selection(await self.tournament(context))


SELECTOR_NAMES = ("judge", "pairwise", "vote")
"""The selectors the command line, the batch jobs and the proxy know by name."""


def make_selector(
    name: str, judge: Runnable[Any, Any] | None = None, *, early_stop: bool = False
) -> Selector:
    """The selector called ``name``: ``"judge"`` (:class:`LLMJudge`), ``"pairwise"``
    (:class:`PairwiseJudge`) or ``"vote"`` (:class:`~fusion_graph.MajorityVote`, with
    ``early_stop`` an early-stopping one); the judges need the ``judge`` model."""
    if name == "vote":
        return MajorityVote(early_stop=early_stop)
    if name not in SELECTOR_NAMES:
        msg = f"unknown selector {name!r}: choose from {', '.join(SELECTOR_NAMES)}"
        raise ValueError(msg)
    if early_stop:
        msg = f"early stopping is a rule of the vote, not of the {name} selector: use vote"
        raise ValueError(msg)
    if judge is None:
        msg = f"the {name} selector needs a judge model"
        raise ValueError(msg)
    return LLMJudge(judge) if name == "judge" else PairwiseJudge(judge)
