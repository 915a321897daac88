"""The engine behind every entry point: validated options plus the two phases of a run,
generate (fan-out, optional critiques) and decide (fuse or select).

``fusion_of_n``, ``best_of_n`` and ``create_fusion_graph`` are thin shells over it, so the
sync and async APIs, the wrapped Runnable, the wrapped node and the subgraph all share
this one implementation.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.types import RetryPolicy

from fusion_graph.errors import DecisionError, NotEnoughCandidatesError
from fusion_graph.hooks import Phase, RunInfo, RunReport, current_hooks
from fusion_graph.nodes.calls import Caller
from fusion_graph.nodes.fuse import call_fusor
from fusion_graph.nodes.generate import (
    CandidateJob,
    EventSink,
    Generator,
    Outcome,
    generate_candidates,
    model_name,
)
from fusion_graph.nodes.select import MajorityVote, SelectionContext, Selector, as_selector
from fusion_graph.prompts import CRITIQUE_PROMPT, FUSION_PROMPT, PromptTemplate
from fusion_graph.state import Candidate, Decision, Strategy, TokenUsage

MAX_CANDIDATES = 256
"""The largest ``n`` accepted. Beyond it, prompts for the fusor or judge outgrow any
context window, and the fan-out is better split into several runs."""

_DEFAULT_FALLBACK = MajorityVote()


def _no_events(_: dict[str, Any]) -> None:
    return None


def stream_writer() -> EventSink:
    """LangGraph's stream writer when running inside a graph, else a no-op."""
    try:
        from langgraph.config import get_stream_writer

        return get_stream_writer()
    except (RuntimeError, KeyError):  # not inside a LangGraph run
        return _no_events


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """Everything one run produced."""

    message: AIMessage
    """The final answer."""
    candidates: list[Candidate]
    """Every candidate, index order, failures included."""
    decision: Decision
    """How the answer was reached."""
    update: dict[str, Any] | None = None
    """For a wrapped node: the update of the candidate the answer builds on."""


@dataclass(frozen=True, kw_only=True)
class FusionEngine:
    """Validated options of a Best-of-N / Fusion-of-N step. Build with :func:`build_engine`."""

    generators: tuple[Generator, ...]
    n: int
    strategy: Strategy
    fusor: Runnable[Any, Any] | None
    selector: Selector | None
    critic: Runnable[Any, Any] | None
    min_candidates: int
    max_concurrency: int | None
    timeout: float | None
    retry: RetryPolicy | None
    fallback: Selector | None
    seed: int | None
    temperature: float | None
    fusion_prompt: PromptTemplate
    critique_prompt: PromptTemplate

    @property
    def is_node(self) -> bool:
        return self.generators[0].is_node

    @property
    def method(self) -> str:
        if self.strategy == "fusion":
            assert self.fusor is not None
            return f"fusion:{model_name(self.fusor)}"
        assert self.selector is not None
        return self.selector.name

    def _caller(self, *, sync: bool, semaphore: asyncio.Semaphore | None) -> Caller:
        return Caller(sync=sync, timeout=self.timeout, retry=self.retry, semaphore=semaphore)

    def _semaphore(self) -> asyncio.Semaphore | None:
        return asyncio.Semaphore(self.max_concurrency) if self.max_concurrency else None

    async def generate(
        self,
        source: Any,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig,
        *,
        sync: bool,
        emit: EventSink,
    ) -> list[Outcome]:
        """Phase 1: every candidate (and its critique), failures recorded, never raised."""
        caller = self._caller(sync=sync, semaphore=self._semaphore())
        seed = self.seed if self.seed is not None else random.randrange(2**31 - MAX_CANDIDATES)
        job = CandidateJob(
            generators=self.generators,
            n=self.n,
            source=source,
            conversation=conversation,
            config=config,
            caller=caller,
            emit=emit,
            seed=seed,
            temperature=self.temperature,
            critic=self.critic,
            critique_prompt=self.critique_prompt,
        )
        return await generate_candidates(job)

    def check_quorum(
        self, candidates: Sequence[Candidate], exceptions: Sequence[Exception | None] = ()
    ) -> None:
        """Raise :class:`NotEnoughCandidatesError` when too few candidates succeeded."""
        ok = sum(c.ok for c in candidates)
        if ok >= self.min_candidates:
            return
        errors: list[Exception] = []
        for i, candidate in enumerate(candidates):
            if candidate.ok:
                continue
            exc = exceptions[i] if i < len(exceptions) else None
            if exc is None:
                info = candidate.error
                detail = f"{info.type}: {info.message}" if info else "no reply"
                exc = RuntimeError(
                    f"candidate {candidate.index} ({candidate.model}) failed: {detail}"
                )
            errors.append(exc)
        msg = (
            f"{ok} of {len(candidates)} candidates succeeded, fewer than "
            f"min_candidates={self.min_candidates}"
        )
        raise NotEnoughCandidatesError(
            msg, errors, candidates=candidates, required=self.min_candidates
        )

    async def decide(
        self,
        conversation: Sequence[BaseMessage],
        candidates: Sequence[Candidate],
        config: RunnableConfig,
        *,
        sync: bool,
        emit: EventSink,
    ) -> tuple[AIMessage, Decision]:
        """Phase 2: fuse or select. Falls back (and says so) when the fusor or selector
        fails, or raises :class:`DecisionError` when no fallback is configured."""
        ok = [c for c in sorted(candidates, key=lambda c: c.index) if c.ok]
        emit({"event": "decision_started", "strategy": self.strategy, "method": self.method})
        with current_hooks().decision(self.strategy, self.method, ok) as done:
            message, decision = await self._decide(conversation, ok, config, sync=sync)
            done(decision, message)
        emit(_decision_event(decision))
        return message, decision

    async def _decide(
        self,
        conversation: Sequence[BaseMessage],
        ok: list[Candidate],
        config: RunnableConfig,
        *,
        sync: bool,
    ) -> tuple[AIMessage, Decision]:
        caller = self._caller(sync=sync, semaphore=self._semaphore())
        context = SelectionContext(
            conversation=conversation, candidates=ok, config=config, caller=caller
        )
        start = time.perf_counter()
        failure: Exception
        if self.strategy == "fusion":
            assert self.fusor is not None
            message, result = await call_fusor(
                self.fusor, self.fusion_prompt, conversation, ok, config, caller
            )
            if message is not None:
                decision = Decision(
                    strategy="fusion",
                    fused=True,
                    method=self.method,
                    usage=TokenUsage.of(message),
                    latency_s=time.perf_counter() - start,
                )
                return message, decision
            assert result.error is not None
            failure = result.error
        else:
            assert self.selector is not None
            try:
                selection = await self.selector.select(context)
                winner = _winner(ok, selection.index)
            except Exception as exc:
                failure = exc
            else:
                decision = Decision(
                    strategy="best_of_n",
                    selected_index=selection.index,
                    score=selection.score,
                    scores=selection.scores,
                    method=self.method,
                    rationale=selection.rationale,
                    usage=selection.usage,
                    latency_s=time.perf_counter() - start,
                )
                assert winner.message is not None
                return winner.message, decision
        return await self._fall_back(context, failure, start)

    async def _fall_back(
        self, context: SelectionContext, failure: Exception, start: float
    ) -> tuple[AIMessage, Decision]:
        if self.fallback is None:
            what = "fusor" if self.strategy == "fusion" else "selector"
            msg = f"the {what} ({self.method}) failed: {type(failure).__name__}: {failure}"
            raise DecisionError(msg) from failure
        try:
            selection = await self.fallback.select(context)
            winner = _winner(context.candidates, selection.index)
        except Exception as exc:
            msg = f"the {self.method} failed ({failure}) and so did the fallback ({exc})"
            raise DecisionError(msg) from exc
        decision = Decision(
            strategy=self.strategy,
            selected_index=selection.index,
            score=selection.score,
            scores=selection.scores,
            method=self.fallback.name,
            fallback=True,
            fallback_reason=f"{self.method} failed: {type(failure).__name__}: {failure}",
            usage=selection.usage,
            latency_s=time.perf_counter() - start,
        )
        assert winner.message is not None
        return winner.message, decision

    async def run(
        self,
        source: Any,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig,
        *,
        sync: bool,
        emit: EventSink | None = None,
    ) -> RunResult:
        """Both phases, as the wrapped Runnable and the wrapped node use them."""
        sink = emit or stream_writer()
        report = RunReport()
        with current_hooks().run(self.run_info("run", conversation), report):
            outcomes = await self.generate(source, conversation, config, sync=sync, emit=sink)
            candidates = [o.candidate for o in outcomes]
            report.candidates = candidates
            self.check_quorum(candidates, [o.exception for o in outcomes])
            message, decision = await self.decide(
                conversation, candidates, config, sync=sync, emit=sink
            )
            report.decision, report.answer = decision, message
        base = _base_update(outcomes, decision)
        return RunResult(message=message, candidates=candidates, decision=decision, update=base)

    async def generate_step(
        self,
        source: Any,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig,
        *,
        sync: bool,
    ) -> list[Candidate]:
        """The subgraph's ``generate`` node."""
        report = RunReport()
        with current_hooks().run(self.run_info("generate", conversation), report):
            outcomes = await self.generate(
                source, conversation, config, sync=sync, emit=stream_writer()
            )
            report.candidates = [o.candidate for o in outcomes]
        return list(report.candidates)

    async def decide_step(
        self,
        conversation: Sequence[BaseMessage],
        candidates: Sequence[Candidate],
        config: RunnableConfig,
        *,
        sync: bool,
    ) -> tuple[AIMessage, Decision]:
        """The subgraph's ``fuse`` / ``select`` node (checks the quorum first)."""
        report = RunReport(candidates=candidates)
        with current_hooks().run(self.run_info("decide", conversation), report):
            self.check_quorum(candidates)
            message, decision = await self.decide(
                conversation, candidates, config, sync=sync, emit=stream_writer()
            )
            report.decision, report.answer = decision, message
        return message, decision

    def run_info(self, phase: Phase, conversation: Sequence[BaseMessage]) -> RunInfo:
        """What the hooks learn when a run (or a subgraph phase) starts."""
        return RunInfo(
            phase=phase,
            strategy=self.strategy,
            n=self.n,
            min_candidates=self.min_candidates,
            method=self.method,
            models=tuple(g.name for g in self.generators),
            conversation=conversation,
        )


def _winner(candidates: Sequence[Candidate], index: int) -> Candidate:
    for candidate in candidates:
        if candidate.index == index and candidate.ok:
            return candidate
    msg = f"the selector chose index {index}, which is not a successful candidate"
    raise ValueError(msg)


def _decision_event(decision: Decision) -> dict[str, Any]:
    return {
        "event": "decision",
        "strategy": decision.strategy,
        "fused": decision.fused,
        "selected_index": decision.selected_index,
        "score": decision.score,
        "method": decision.method,
        "fallback": decision.fallback,
        "latency_s": round(decision.latency_s, 4),
    }


def _base_update(outcomes: Sequence[Outcome], decision: Decision) -> dict[str, Any] | None:
    """For a wrapped node: the winner's update, or (fused) the first successful one's."""
    ok = [o for o in outcomes if o.candidate.ok and o.update is not None]
    if not ok:
        return None
    if decision.selected_index is not None:
        for outcome in ok:
            if outcome.candidate.index == decision.selected_index:
                return outcome.update
    return ok[0].update


def _check_positive(name: str, value: float | None, *, integer: bool = False) -> None:
    if value is None:
        return
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        msg = f"{name} must be an int, got {type(value).__name__}: {value!r}"
        raise TypeError(msg)
    if value <= 0:
        msg = f"{name} must be positive, got {value!r}"
        raise ValueError(msg)


def build_engine(
    step: Any,
    *,
    n: int,
    strategy: Strategy,
    fusor: Runnable[Any, Any] | None = None,
    selector: Any = None,
    critic: Runnable[Any, Any] | None = None,
    min_candidates: int | None = None,
    max_concurrency: int | None = None,
    timeout: float | None = None,
    retry: RetryPolicy | None = None,
    fallback: Selector | Literal["default"] | None = "default",
    seed: int | None = None,
    temperature: float | None = None,
    fusion_prompt: PromptTemplate = FUSION_PROMPT,
    critique_prompt: PromptTemplate = CRITIQUE_PROMPT,
) -> FusionEngine:
    """Validate every option now, so misuse fails when the step is built, not mid-run."""
    _check_positive("n", n, integer=True)
    if n > MAX_CANDIDATES:
        msg = f"n={n} is above the cap of {MAX_CANDIDATES} candidates per run"
        raise ValueError(msg)
    if strategy not in ("fusion", "best_of_n"):
        msg = f"strategy must be 'fusion' or 'best_of_n', got {strategy!r}"
        raise ValueError(msg)
    pool = list(step) if isinstance(step, list | tuple) else [step]
    if not pool:
        msg = "the generator pool is empty: pass a model, a node function, or a list of them"
        raise ValueError(msg)
    generators = tuple(Generator.of(g) for g in pool)
    if len({g.is_node for g in generators}) > 1:
        msg = "a generator pool cannot mix Runnables and node functions"
        raise TypeError(msg)
    if strategy == "fusion":
        if fusor is None:
            msg = "fusion needs a fusor: pass fusor=<chat model> (it can be the generator model)"
            raise ValueError(msg)
        if not isinstance(fusor, Runnable):
            msg = f"fusor must be a chat model or Runnable, got {type(fusor).__name__}"
            raise TypeError(msg)
        if selector is not None:
            msg = "fusion takes a fusor, not a selector; use best_of_n for a selector"
            raise ValueError(msg)
    else:
        if selector is None:
            msg = (
                "best_of_n needs a selector: LLMJudge(model), PairwiseJudge(model), "
                "MajorityVote() or a reward function (messages, candidate) -> float"
            )
            raise ValueError(msg)
        if fusor is not None:
            msg = "best_of_n takes a selector, not a fusor; use fusion_of_n for a fusor"
            raise ValueError(msg)
    if critic is not None and not isinstance(critic, Runnable):
        msg = f"critic must be a chat model or Runnable, got {type(critic).__name__}"
        raise TypeError(msg)
    required = 1 if min_candidates is None else min_candidates
    _check_positive("min_candidates", required, integer=True)
    if required > n:
        msg = f"min_candidates={required} cannot exceed n={n}"
        raise ValueError(msg)
    _check_positive("max_concurrency", max_concurrency, integer=True)
    _check_positive("timeout", timeout)
    if retry is not None and not isinstance(retry, RetryPolicy):
        msg = f"retry must be a langgraph.types.RetryPolicy, got {type(retry).__name__}"
        raise TypeError(msg)
    if temperature is not None and temperature < 0:
        msg = f"temperature must be >= 0, got {temperature}"
        raise ValueError(msg)
    chosen_fallback = _DEFAULT_FALLBACK if fallback == "default" else fallback
    if chosen_fallback is not None and not isinstance(chosen_fallback, Selector):
        msg = f"fallback must be a Selector or None, got {type(chosen_fallback).__name__}"
        raise TypeError(msg)
    return FusionEngine(
        generators=generators,
        n=n,
        strategy=strategy,
        fusor=fusor,
        selector=as_selector(selector) if selector is not None else None,
        critic=critic,
        min_candidates=required,
        max_concurrency=max_concurrency,
        timeout=timeout,
        retry=retry,
        fallback=chosen_fallback,
        seed=seed,
        temperature=temperature,
        fusion_prompt=fusion_prompt,
        critique_prompt=critique_prompt,
    )
