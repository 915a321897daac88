"""Best-of-N selectors: each picks one candidate and says how it scored them.

Every selector validates what its judge model says. An answer that cannot be parsed (or
a score far outside 1-10) leaves that candidate unscored; when no candidate could be
scored at all the selector raises :class:`~fusion_graph.errors.SelectorOutputError`, and
the run's fallback selector decides instead (recorded in the decision).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel, Field

from fusion_graph.errors import SelectorOutputError
from fusion_graph.nodes.calls import Caller
from fusion_graph.nodes.generate import model_name, role_config
from fusion_graph.prompts import (
    JUDGE_PROMPT,
    PAIRWISE_PROMPT,
    PromptTemplate,
    build_judge_messages,
    build_pairwise_messages,
    message_text,
)
from fusion_graph.state import Candidate, TokenUsage


@dataclass(frozen=True, kw_only=True)
class SelectionContext:
    """What a selector gets: the conversation, the successful candidates (index order),
    and a way to call judge models with the run's retries, timeout and config."""

    conversation: Sequence[BaseMessage]
    candidates: Sequence[Candidate]
    config: RunnableConfig
    caller: Caller

    async def ask(
        self, model: Runnable[Any, Any], messages: list[BaseMessage], *, run_name: str
    ) -> Any:
        """Call a judge model; raises its error after the retries."""
        config = role_config(self.config, role="judge", run_name=run_name)
        result = await self.caller.call(
            lambda: model.invoke(messages, config), lambda: model.ainvoke(messages, config)
        )
        if result.error is not None:
            raise result.error
        return result.value


@dataclass(frozen=True, kw_only=True)
class Selection:
    """A selector's verdict."""

    index: int
    """The chosen candidate's index."""
    score: float | None
    """Its score."""
    scores: dict[int, float] = field(default_factory=dict)
    """Every scored candidate's score, by index."""
    rationale: str | None = None
    """The judge's reason for the winner, when it gave one."""
    usage: TokenUsage | None = None
    """Tokens the judge calls used."""


class Selector(ABC):
    """Picks one candidate. Subclass it to write your own: implement :meth:`select`."""

    name: str = "selector"
    """Recorded as ``Decision.method``."""

    @abstractmethod
    async def select(self, context: SelectionContext) -> Selection:
        """Choose among ``context.candidates`` (never empty)."""


def _best(scores: dict[int, float]) -> int:
    """The highest score; ties go to the lowest index."""
    return min(scores, key=lambda i: (-scores[i], i))


def _sum_usage(messages: Sequence[Any]) -> TokenUsage | None:
    usages = [TokenUsage.of(m) for m in messages if isinstance(m, AIMessage)]
    present = [u for u in usages if u is not None]
    return sum(present, TokenUsage()) if present else None


# --- reward function ---------------------------------------------------------------------

RewardFn = Callable[[Sequence[BaseMessage], Candidate], float | Awaitable[float]]
"""A reward function: ``(conversation, candidate) -> score``, sync or async."""


class RewardFunction(Selector):
    """Best-of-N by a reward function ``(messages, candidate) -> float`` (sync or async).

    The highest reward wins (ties: the lowest index). A candidate whose reward raises or is
    not a finite number is left unscored.
    """

    def __init__(self, fn: RewardFn, *, name: str | None = None) -> None:
        if not callable(fn):
            msg = f"a reward function must be callable, got {type(fn).__name__}"
            raise TypeError(msg)
        self.fn = fn
        self.name = name or f"reward:{getattr(fn, '__name__', type(fn).__name__)}"

    async def select(self, context: SelectionContext) -> Selection:
        results = await asyncio.gather(
            *(
                context.caller.call_function(self.fn, context.conversation, c)
                for c in context.candidates
            )
        )
        scores: dict[int, float] = {}
        for candidate, result in zip(context.candidates, results, strict=True):
            value = result.value
            if result.error is None and isinstance(value, int | float) and math.isfinite(value):
                scores[candidate.index] = float(value)
        if not scores:
            errors = {type(r.error).__name__ for r in results if r.error is not None}
            msg = f"the reward function scored none of the candidates (errors: {sorted(errors)})"
            raise SelectorOutputError(msg)
        best = _best(scores)
        return Selection(index=best, score=scores[best], scores=scores)


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


class LLMJudge(Selector):
    """Best-of-N by an LLM judge that scores each candidate alone (1-10, with a rationale),
    all candidates in parallel. The highest score wins; ties go to the lowest index.

    Args:
        model: The judge chat model.
        prompt: The judge prompt (default :data:`~fusion_graph.prompts.JUDGE_PROMPT`).
        structured: Ask for structured output (``with_structured_output``) instead of
            parsing JSON from text. Use it with models that call tools reliably; the
            default text parsing works with any chat model.

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
    ) -> None:
        if not isinstance(model, Runnable):
            msg = f"LLMJudge needs a chat model or Runnable, got {type(model).__name__}"
            raise TypeError(msg)
        self.model = model
        self.prompt = prompt
        self.structured = structured
        self.name = f"llm_judge:{model_name(model)}"
        self._runnable: Runnable[Any, Any] = (
            model.with_structured_output(JudgeVerdict, include_raw=True)  # type: ignore[attr-defined]
            if structured
            else model
        )

    async def _judge(
        self, context: SelectionContext, candidate: Candidate
    ) -> tuple[float | None, str | None, Any]:
        messages = build_judge_messages(self.prompt, context.conversation, candidate)
        try:
            reply = await context.ask(
                self._runnable, messages, run_name=f"judge[{candidate.index}]"
            )
        except Exception:  # a failed judge call leaves this candidate unscored
            return None, None, None
        if self.structured and isinstance(reply, dict):
            parsed, raw = reply.get("parsed"), reply.get("raw")
            if isinstance(parsed, JudgeVerdict):
                return _valid_score(parsed.score), parsed.rationale, raw
            reply = raw
        text = message_text(reply) if isinstance(reply, BaseMessage) else str(reply)
        score, rationale = parse_judge_output(text)
        return score, rationale, reply

    async def select(self, context: SelectionContext) -> Selection:
        verdicts = await asyncio.gather(*(self._judge(context, c) for c in context.candidates))
        scores = {
            c.index: score
            for c, (score, _, _) in zip(context.candidates, verdicts, strict=True)
            if score is not None
        }
        usage = _sum_usage([raw for _, _, raw in verdicts])
        if not scores:
            msg = (
                f"the judge {model_name(self.model)} gave no valid 1-10 score for any of "
                f"{len(context.candidates)} candidates"
            )
            raise SelectorOutputError(msg)
        best = _best(scores)
        rationale = verdicts[[c.index for c in context.candidates].index(best)][1]
        return Selection(
            index=best, score=scores[best], scores=scores, rationale=rationale, usage=usage
        )


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


class PairwiseJudge(Selector):
    """Best-of-N by a knockout tournament of pairwise comparisons.

    Each pair is judged twice, once in each order, to cancel the judge's position bias:
    a candidate wins its match with more of the two votes; a draw (ties, disagreeing
    orders or unparseable verdicts) goes to the lower index. Matches of a round run in
    parallel; an odd candidate out gets a bye. A candidate's score is its matches won.
    """

    def __init__(
        self, model: Runnable[Any, Any], *, prompt: PromptTemplate = PAIRWISE_PROMPT
    ) -> None:
        if not isinstance(model, Runnable):
            msg = f"PairwiseJudge needs a chat model or Runnable, got {type(model).__name__}"
            raise TypeError(msg)
        self.model = model
        self.prompt = prompt
        self.name = f"pairwise_judge:{model_name(model)}"

    async def _verdict(
        self, context: SelectionContext, first: Candidate, second: Candidate
    ) -> tuple[str | None, Any]:
        messages = build_pairwise_messages(self.prompt, context.conversation, first, second)
        try:
            reply = await context.ask(
                self.model, messages, run_name=f"pairwise[{first.index}v{second.index}]"
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
        a_votes = (forward[0] == "A") + (backward[0] == "B")
        b_votes = (forward[0] == "B") + (backward[0] == "A")
        return (b if b_votes > a_votes else a), [forward, backward]

    async def select(self, context: SelectionContext) -> Selection:
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
        if verdicts and all(v is None for v, _ in verdicts):
            msg = f"the pairwise judge {model_name(self.model)} gave no valid verdict in any match"
            raise SelectorOutputError(msg)
        winner = alive[0]
        usage = _sum_usage([raw for _, raw in verdicts])
        return Selection(index=winner.index, score=wins[winner.index], scores=wins, usage=usage)


# --- majority vote -----------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*(.+)")
_ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:)\s*(\S.*)", re.IGNORECASE | re.DOTALL)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def final_answer(text: str) -> str:
    """A normalised final answer for voting: the ``\\boxed{}`` / ``####`` / "answer is"
    part when present (else the whole text), lower-cased, markdown and trailing
    punctuation stripped, whitespace collapsed, thousands separators removed."""
    found = None
    for pattern in (_BOXED, _HASHES, _ANSWER_IS):
        matches = pattern.findall(text)
        if matches:
            found = matches[-1]
            break
    answer = (found if found is not None else text).strip()
    answer = answer.splitlines()[0] if found is not None and answer else answer
    answer = _THOUSANDS.sub("", answer.replace("*", "").replace("`", ""))
    return " ".join(answer.lower().split()).strip(" .!;:$")


def tool_calls_key(message: AIMessage) -> str:
    """Tool calls normalised for voting: names and arguments, order and ids ignored."""
    calls = sorted(
        json.dumps({"name": c["name"], "args": c["args"]}, sort_keys=True)
        for c in message.tool_calls
    )
    return "tool_calls:" + "|".join(calls)


class MajorityVote(Selector):
    """Best-of-N by self-consistency: the most common normalised final answer wins (for
    tool-calling candidates, the most common set of tool calls). Ties go to the answer
    seen first; the winner is the lowest-index candidate with that answer, scored by its
    share of the votes. Makes no model calls, so it never fails: the default fallback.

    Args:
        extract: Turns a candidate's text into the answer voted on
            (default :func:`final_answer`).
    """

    def __init__(self, *, extract: Callable[[str], str] = final_answer) -> None:
        self.extract = extract
        self.name = "majority_vote"

    def key(self, candidate: Candidate) -> str:
        if candidate.message is not None and candidate.message.tool_calls:
            return tool_calls_key(candidate.message)
        return self.extract(candidate.text)

    async def select(self, context: SelectionContext) -> Selection:
        keys = {c.index: self.key(c) for c in context.candidates}
        votes = Counter(keys.values())
        total = len(keys)
        first_seen = {k: min(i for i, v in keys.items() if v == k) for k in votes}
        top = min(votes, key=lambda k: (-votes[k], first_seen[k]))
        scores = {i: votes[k] / total for i, k in keys.items()}
        index = first_seen[top]
        return Selection(index=index, score=scores[index], scores=scores)


def as_selector(selector: object) -> Selector:
    """A :class:`Selector` as is; a plain callable as a :class:`RewardFunction`."""
    if isinstance(selector, Selector):
        return selector
    if isinstance(selector, Runnable):
        msg = (
            "selector is a model; wrap it to say how to use it: LLMJudge(model) or "
            "PairwiseJudge(model)"
        )
        raise TypeError(msg)
    if callable(selector):
        return RewardFunction(selector)
    msg = (
        "selector must be a Selector (LLMJudge, PairwiseJudge, MajorityVote) or a reward "
        f"function (messages, candidate) -> float, got {type(selector).__name__}"
    )
    raise TypeError(msg)
