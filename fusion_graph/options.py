"""The options of a Best-of-N / Fusion-of-N step: one frozen object, validated once.

``fusion_of_n``, ``best_of_n`` and ``create_fusion_graph`` take these as keyword arguments
(same names everywhere) and build a :class:`FusionOptions`, so misuse fails when the step
is built, with a message that names the option, not in the middle of a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from langchain_core.runnables import Runnable
from langgraph.types import RetryPolicy

from fusion_graph.budget import Budget, CostFn, total_tokens
from fusion_graph.nodes.decide import Decider, Selector
from fusion_graph.nodes.fanout import MAX_CANDIDATES, FanOut
from fusion_graph.nodes.fuse import Fuse
from fusion_graph.nodes.generator import Generator
from fusion_graph.nodes.select import DEFAULT_FALLBACK, MajorityVote, RewardFn, Select
from fusion_graph.prompts import CRITIQUE_PROMPT, FUSION_PROMPT, PromptTemplate
from fusion_graph.types import Strategy


def _check_int(name: str, value: object, *, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        msg = f"{name} must be an int, got {type(value).__name__}: {value!r}"
        raise TypeError(msg)
    if value < 1:
        accepted = f"1 to {high}" if high is not None else "1 or more"
        msg = f"{name} must be positive ({accepted}), got {value}"
        raise ValueError(msg)
    if high is not None and value > high:
        msg = f"{name}={value} is above the cap of {high}"
        raise ValueError(msg)


def _check_number(name: str, value: object, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{name} must be a number, got {type(value).__name__}: {value!r}"
        raise TypeError(msg)
    if (positive and value <= 0) or value < 0:
        msg = f"{name} must be {'positive' if positive else '>= 0'}, got {value!r}"
        raise ValueError(msg)


@dataclass(frozen=True, kw_only=True)
class FusionOptions:
    """Everything a Best-of-N / Fusion-of-N step is built with, checked on creation."""

    n: int
    """How many candidates (1 to 256)."""
    strategy: Strategy
    """``"fusion"`` (needs ``fusor``) or ``"best_of_n"`` (needs ``selector``)."""
    fusor: Runnable[Any, Any] | None = None
    """FusioN: the chat model that writes the final answer from all candidates."""
    prompt: PromptTemplate = FUSION_PROMPT
    """FusioN: the fusor's prompt."""
    selector: Selector | RewardFn | None = None
    """BoN: the selector (or a reward function ``(messages, candidate) -> float``)."""
    fallback: Selector | None = DEFAULT_FALLBACK
    """Decides when the fusor or selector fails (recorded in the decision); ``None``
    raises :class:`~fusion_graph.DecisionError` instead."""
    critic: Runnable[Any, Any] | None = None
    """Critiques each candidate before the decision (shown to the fusor or judges)."""
    critique_prompt: PromptTemplate = CRITIQUE_PROMPT
    """The critic's prompt."""
    min_candidates: int = 1
    """Successful candidates needed to decide; below it the run raises
    :class:`~fusion_graph.NotEnoughCandidatesError` carrying every failure."""
    max_concurrency: int | None = None
    """Bound on model calls in flight in one run (default: all N at once)."""
    timeout: float | None = None
    """Per-attempt timeout of each model call, in seconds."""
    retry: RetryPolicy | None = None
    """Retries with backoff for each model call; timeouts are always retryable."""
    seed: int | None = None
    """Base sampling seed: candidate ``i`` gets ``seed + i`` on models with a ``seed``
    field. Default: a random base per run."""
    temperature: float | None = None
    """Sampling temperature for generators with a ``temperature`` field."""
    grace: float | None = None
    """Straggler cut-off, in seconds: once ``min_candidates`` candidates succeeded, wait at
    most this long for the others, then cancel them (kept as ``status="cancelled"``) and
    decide with what arrived. ``None`` waits for every candidate."""
    max_total_tokens: float | None = None
    """The run's token budget: once its calls have used this many tokens (as ``cost``
    counts them), no new candidate, critique, judge or fusor call starts; the decision
    says so (``Decision.stopped == "budget"``). See :mod:`fusion_graph.budget`."""
    cost: CostFn | None = None
    """What one call costs against ``max_total_tokens``, from its reported
    :class:`~fusion_graph.TokenUsage` (default: its total tokens), e.g. a price."""

    def __post_init__(self) -> None:
        _check_int("n", self.n, high=MAX_CANDIDATES)
        if self.strategy not in ("fusion", "best_of_n"):
            msg = f"strategy must be 'fusion' or 'best_of_n', got {self.strategy!r}"
            raise ValueError(msg)
        if self.strategy == "fusion":
            if self.fusor is None:
                msg = (
                    "fusion needs a fusor: pass fusor=<chat model> (it can be the generator model)"
                )
                raise ValueError(msg)
            if self.selector is not None:
                msg = "fusion takes a fusor, not a selector; use best_of_n for a selector"
                raise ValueError(msg)
        else:
            if self.selector is None:
                msg = (
                    "best_of_n needs a selector: LLMJudge(model), PairwiseJudge(model), "
                    "MajorityVote() or a reward function (messages, candidate) -> float"
                )
                raise ValueError(msg)
            if self.fusor is not None:
                msg = "best_of_n takes a selector, not a fusor; use fusion_of_n for a fusor"
                raise ValueError(msg)
        if self.critic is not None and not isinstance(self.critic, Runnable):
            msg = f"critic must be a chat model or Runnable, got {type(self.critic).__name__}"
            raise TypeError(msg)
        _check_int("min_candidates", self.min_candidates)
        if self.min_candidates > self.n:
            msg = f"min_candidates={self.min_candidates} cannot exceed n={self.n}"
            raise ValueError(msg)
        if self.max_concurrency is not None:
            _check_int("max_concurrency", self.max_concurrency)
        if self.timeout is not None:
            _check_number("timeout", self.timeout, positive=True)
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            msg = f"retry must be a langgraph.types.RetryPolicy, got {type(self.retry).__name__}"
            raise TypeError(msg)
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            msg = f"seed must be an int or None, got {type(self.seed).__name__}: {self.seed!r}"
            raise TypeError(msg)
        if self.temperature is not None:
            _check_number("temperature", self.temperature, positive=False)
        if self.grace is not None:
            _check_number("grace", self.grace, positive=False)
        if self.max_total_tokens is not None:
            _check_number("max_total_tokens", self.max_total_tokens, positive=True)
        if self.cost is not None and not callable(self.cost):
            msg = f"cost must be a function (TokenUsage) -> float, got {type(self.cost).__name__}"
            raise TypeError(msg)
        if self.cost is not None and self.max_total_tokens is None:
            msg = "cost counts calls against max_total_tokens: pass max_total_tokens too"
            raise ValueError(msg)
        if not isinstance(self.critique_prompt, PromptTemplate):
            kind = type(self.critique_prompt).__name__
            msg = f"critique_prompt must be a PromptTemplate, got {kind}"
            raise TypeError(msg)
        self.critique_prompt.check("critique")
        self.decider()  # the decider checks its own arguments (fusor, selector, fallback)

    def decider(self) -> Decider:
        """The :class:`~fusion_graph.Fuse` or :class:`~fusion_graph.Select` these options
        describe."""
        if self.strategy == "fusion":
            assert self.fusor is not None
            return Fuse(self.fusor, prompt=self.prompt, fallback=self.fallback)
        assert self.selector is not None
        return Select(self.selector, fallback=self.fallback)

    def fan_out(self, generators: tuple[Generator, ...]) -> FanOut:
        """The :class:`~fusion_graph.nodes.fanout.FanOut` of these options over a pool."""
        return FanOut(
            generators=generators,
            n=self.n,
            seed=self.seed,
            temperature=self.temperature,
            critic=self.critic,
            critique_prompt=self.critique_prompt,
            quorum=self.min_candidates,
            grace=self.grace,
            early_stop=self.early_stop(),
        )

    def early_stop(self) -> MajorityVote | None:
        """The early-stopping vote, when the selector is one."""
        vote = self.selector
        return vote if isinstance(vote, MajorityVote) and vote.early_stop is not None else None

    def budget(self) -> Budget | None:
        """A fresh token budget for one run, when ``max_total_tokens`` is set."""
        if self.max_total_tokens is None:
            return None
        return Budget(self.max_total_tokens, self.cost or total_tokens)
