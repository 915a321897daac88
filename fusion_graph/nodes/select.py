"""Best-of-N: a :class:`Select` decider and the selectors that need no judge model: a
reward function and a majority vote (self-consistency). The LLM judges are in
:mod:`fusion_graph.nodes.judges`.

A selector that cannot score any candidate raises
:class:`~fusion_graph.errors.SelectorOutputError`, and the decider's fallback selector
decides instead (recorded in the decision).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable

from fusion_graph.errors import SelectorOutputError
from fusion_graph.nodes.decide import (
    Decider,
    Selection,
    SelectionContext,
    Selector,
    TokenSink,
    checked_fallback,
    winner,
)
from fusion_graph.types import Candidate, Decision


def best_index(scores: dict[int, float]) -> int:
    """The highest score; ties go to the lowest index."""
    return min(scores, key=lambda i: (-scores[i], i))


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
            *(context.call(self.fn, context.conversation, c) for c in context.candidates),
            return_exceptions=True,
        )
        scores: dict[int, float] = {}
        for candidate, value in zip(context.candidates, results, strict=True):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue  # the reward raised, or is not a number
            if math.isfinite(value):
                scores[candidate.index] = float(value)
        if not scores:
            errors = {type(r).__name__ for r in results if isinstance(r, Exception)}
            msg = f"the reward function scored none of the candidates (errors: {sorted(errors)})"
            raise SelectorOutputError(msg)
        best = best_index(scores)
        return Selection(index=best, score=scores[best], scores=scores)


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


@dataclass(frozen=True)
class EarlyStop:
    """When a majority vote may stop sampling: adaptive consistency (Aggarwal et al., 2023,
    "Let's Sample Step by Step: Adaptive-Consistency for Efficient Reasoning").

    Candidates are made in rounds of ``round_size``; between rounds, with ``v1`` votes for
    the leading answer and ``v2`` for the runner-up, the rule takes the posterior
    probability (uniform Beta prior) that the leader's share of the model's answers is above
    the runner-up's, ``P = P[Binomial(v1 + v2 + 1, 1/2) <= v1]``, and stops once
    ``P >= threshold``. With the defaults, four agreeing answers stop a run (P = 0.969);
    three do not (P = 0.938), nor do 5 against 1.

    Args:
        threshold: The confidence at which to stop (above 0.5, below 1; higher samples
            more).
        round_size: Candidates per round (larger: fewer rounds, so less latency, more
            samples).
    """

    threshold: float = 0.95
    round_size: int = 2

    def __post_init__(self) -> None:
        if not 0.5 < self.threshold < 1:
            msg = f"EarlyStop threshold must be in (0.5, 1), got {self.threshold!r}"
            raise ValueError(msg)
        if not isinstance(self.round_size, int) or self.round_size < 1:
            msg = f"EarlyStop round_size must be a positive int, got {self.round_size!r}"
            raise ValueError(msg)

    @staticmethod
    def confidence(leader: int, runner_up: int) -> float:
        """P(the leader's true share is above the runner-up's), given their votes."""
        trials = leader + runner_up + 1
        return float(sum(math.comb(trials, k) for k in range(leader + 1)) / 2**trials)


class MajorityVote(Selector):
    """Best-of-N by self-consistency: the most common normalised final answer wins (for
    tool-calling candidates, the most common set of tool calls). Ties go to the answer
    seen first; the winner is the lowest-index candidate with that answer, scored by its
    share of the votes. Makes no model calls, so it never fails: the default fallback.

    Args:
        extract: Turns a candidate's text into the answer voted on
            (default :func:`final_answer`).
        early_stop: Sample in rounds and stop once the vote is settled: an
            :class:`EarlyStop` rule, or ``True`` for its defaults. The decision then says
            how many candidates were made and why it stopped (``Decision.stop_reason``).
    """

    def __init__(
        self,
        *,
        extract: Callable[[str], str] = final_answer,
        early_stop: EarlyStop | bool | None = None,
    ) -> None:
        self.extract = extract
        self.early_stop = EarlyStop() if early_stop is True else early_stop or None
        if self.early_stop is not None and not isinstance(self.early_stop, EarlyStop):
            kind = type(early_stop).__name__
            msg = f"early_stop must be an EarlyStop or True, got {kind}: {early_stop!r}"
            raise TypeError(msg)
        self.name = "majority_vote"

    def key(self, candidate: Candidate) -> str:
        if candidate.message is not None and candidate.message.tool_calls:
            return tool_calls_key(candidate.message)
        return self.extract(candidate.text)

    @property
    def round_size(self) -> int:
        """Candidates per round of an early-stopping vote."""
        return self.early_stop.round_size if self.early_stop is not None else 1

    def reason_to_stop(self, candidates: Sequence[Candidate]) -> str | None:
        """Why the vote over ``candidates`` (the successful ones so far) is settled under
        the :class:`EarlyStop` rule, or ``None``."""
        if self.early_stop is None or not candidates:
            return None
        votes = Counter(self.key(c) for c in candidates).most_common(2)
        leader = votes[0][1]
        runner_up = votes[1][1] if len(votes) > 1 else 0
        confidence = EarlyStop.confidence(leader, runner_up)
        if confidence < self.early_stop.threshold:
            return None
        return (
            f"vote settled after {len(candidates)} answers: the leader has {leader}, the "
            f"runner-up {runner_up}; P(leader ahead) = {confidence:.3f} >= "
            f"{self.early_stop.threshold:g}"
        )

    async def select(self, context: SelectionContext) -> Selection:
        keys = {c.index: self.key(c) for c in context.candidates}
        votes = Counter(keys.values())
        total = len(keys)
        first_seen = {k: min(i for i, v in keys.items() if v == k) for k in votes}
        top = min(votes, key=lambda k: (-votes[k], first_seen[k]))
        scores = {i: votes[k] / total for i, k in keys.items()}
        index = first_seen[top]
        return Selection(index=index, score=scores[index], scores=scores)


DEFAULT_FALLBACK = MajorityVote()
"""The default fallback of every decider: a vote makes no model call, so it never fails."""


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


class Select(Decider):
    """BoN: a selector picks one candidate, unchanged (tool calls included).

    Args:
        selector: :class:`~fusion_graph.LLMJudge`, :class:`~fusion_graph.PairwiseJudge`,
            :class:`MajorityVote`, your own :class:`Selector`, or a reward function
            ``(messages, candidate) -> float`` (sync or async; highest wins).
        fallback: Selector used when ``selector`` fails (e.g. a judge that answers nonsense
            for every candidate). Default :class:`MajorityVote`; ``None`` raises.

    Example:
        >>> from fusion_graph import MajorityVote, Select
        >>> message, decision = Select(MajorityVote()).decide("2+2?", ["4", "5", "4"])
        >>> message.content, decision.selected_index
        ('4', 0)
    """

    strategy = "best_of_n"

    def __init__(
        self, selector: Selector | RewardFn, *, fallback: Selector | None = DEFAULT_FALLBACK
    ) -> None:
        self.selector = as_selector(selector)
        self.fallback = checked_fallback(fallback)

    @property
    def method(self) -> str:
        return self.selector.name

    async def attempt(
        self, context: SelectionContext, *, on_token: TokenSink | None = None
    ) -> tuple[AIMessage, Decision]:
        selection = await self.selector.select(context)
        chosen = winner(context.candidates, selection.index)
        decision = Decision(
            strategy="best_of_n",
            selected_index=selection.index,
            score=selection.score,
            scores=selection.scores,
            method=self.method,
            rationale=selection.rationale,
            usage=selection.usage,
        )
        assert chosen.message is not None
        return chosen.message, decision
