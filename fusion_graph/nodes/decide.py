"""Fan-in: a :class:`Decider` turns a conversation and its candidates into one answer and a
:class:`~fusion_graph.Decision`.

Two kinds exist: :class:`~fusion_graph.Fuse` (a fusor model writes a new answer, FusioN)
and :class:`~fusion_graph.Select` (a :class:`Selector` picks one candidate, BoN). Both fall
back to another selector (by default a majority vote) when the fusor or selector fails,
and say so in the decision. Deciders are public: call one on candidates you already have::

    message, decision = Fuse(llm).decide("Capital of France?", ["Paris", "Lyon", "Paris"])
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.errors import GraphBubbleUp

from fusion_graph import events
from fusion_graph.errors import DecisionError
from fusion_graph.events import EventSink
from fusion_graph.hooks import current_hooks
from fusion_graph.messages import to_messages
from fusion_graph.runtime import CallAborted, Caller, role_config, run_sync
from fusion_graph.types import Candidate, Decision, Strategy, TokenUsage

logger = logging.getLogger("fusion_graph")

DECISION_METADATA_KEY = "fusion_graph"
"""Key under which a fused answer's (or a fallback's) ``response_metadata`` says how it
was decided: ``strategy``, ``method``, ``fused``, ``selected_index``, ``fallback``,
``fallback_reason``. A candidate chosen by its selector is returned untouched."""

TokenSink = Callable[[AIMessageChunk], Any]
"""Receives the fused answer's chunks as the fusor streams them."""


class SelectionContext:
    """What a selector gets: the conversation, the successful candidates (index order),
    and ways to call models and functions with the run's retries, timeout, concurrency
    bound and config."""

    def __init__(
        self,
        conversation: Sequence[BaseMessage],
        candidates: Sequence[Candidate],
        *,
        config: RunnableConfig | None = None,
        caller: Caller | None = None,
    ) -> None:
        self.conversation = conversation
        """The conversation the candidates answer."""
        self.candidates = candidates
        """The successful candidates, index order (never empty)."""
        self.config = config or {}
        """The run's config: pass it on to calls so callbacks and traces nest."""
        self._caller = caller or Caller(sync=False)

    async def ask(
        self, model: Runnable[Any, Any], messages: list[BaseMessage], *, run_name: str
    ) -> Any:
        """Call a judge model; raises its error after the retries."""
        config = role_config(self.config, role="judge", run_name=run_name)
        result = await self._caller.call_model(model, messages, config)
        if result.error is not None:
            raise result.error
        return result.value

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a plain function (sync or async) with the run's policy; raises its error."""
        result = await self._caller.call_function(fn, *args)
        if result.error is not None:
            raise result.error
        return result.value

    async def call_either(
        self, sync_fn: Callable[[], Any], async_fn: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Call ``sync_fn`` (sync API, on a worker thread) or ``async_fn`` (async API) with
        the run's policy; raises the last error."""
        result = await self._caller.call(sync_fn, async_fn)
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


def checked_fallback(fallback: object) -> Selector | None:
    """``fallback`` if it is a :class:`Selector` or ``None``; ``TypeError`` otherwise."""
    if fallback is not None and not isinstance(fallback, Selector):
        msg = f"fallback must be a Selector or None, got {type(fallback).__name__}"
        raise TypeError(msg)
    return fallback


def as_candidates(answers: Sequence[Candidate | AIMessage | str]) -> list[Candidate]:
    """Candidates from what the caller has: :class:`Candidate` s as they are (sorted by
    index), strings and ``AIMessage`` s indexed by position."""
    given = [a for a in answers if isinstance(a, Candidate)]
    if len(given) == len(answers):
        return sorted(given, key=lambda c: c.index)
    return [Candidate.of(a, index=i) for i, a in enumerate(answers)]


def winner(candidates: Sequence[Candidate], index: int) -> Candidate:
    """The successful candidate with ``index``; ``ValueError`` if there is none."""
    for candidate in candidates:
        if candidate.index == index and candidate.ok:
            return candidate
    msg = f"the selector chose index {index}, which is not a successful candidate"
    raise ValueError(msg)


class Decider(ABC):
    """Turns candidates into one answer. Subclasses implement :meth:`attempt`; the base
    adds the fallback, progress events and tracing hooks."""

    strategy: Strategy
    """``"fusion"`` or ``"best_of_n"``."""
    fallback: Selector | None
    """Decides when :meth:`attempt` fails; ``None`` raises :class:`DecisionError`."""

    @property
    @abstractmethod
    def method(self) -> str:
        """What decides, as recorded in ``Decision.method``."""

    @abstractmethod
    async def attempt(
        self,
        context: SelectionContext,
        *,
        on_token: TokenSink | None = None,
    ) -> tuple[AIMessage, Decision]:
        """Decide among ``context.candidates`` (successful ones, index order); raise on
        failure (the fallback then decides)."""

    async def adecide(
        self,
        conversation: Any,
        candidates: Sequence[Candidate | AIMessage | str],
        *,
        config: RunnableConfig | None = None,
    ) -> tuple[AIMessage, Decision]:
        """The answer and the decision for candidates you already have.

        Args:
            conversation: The prompt: a string, messages or a prompt value.
            candidates: :class:`~fusion_graph.Candidate` s, ``AIMessage`` s or strings.
            config: A ``RunnableConfig`` for the decision's model calls (callbacks, tags).
        """
        return await self.run(
            to_messages(conversation), as_candidates(candidates), config or {}, Caller(sync=False)
        )

    def decide(
        self,
        conversation: Any,
        candidates: Sequence[Candidate | AIMessage | str],
        *,
        config: RunnableConfig | None = None,
    ) -> tuple[AIMessage, Decision]:
        """Sync :meth:`adecide`."""
        messages, given = to_messages(conversation), as_candidates(candidates)
        return run_sync(lambda: self.run(messages, given, config or {}, Caller(sync=True)))

    async def run(
        self,
        conversation: Sequence[BaseMessage],
        candidates: Sequence[Candidate],
        config: RunnableConfig,
        caller: Caller,
        *,
        emit: EventSink | None = None,
        on_token: TokenSink | None = None,
    ) -> tuple[AIMessage, Decision]:
        """Decide among the successful ``candidates`` with the run's ``caller``, falling back
        (and saying so) when the fusor or selector fails."""
        ok = [c for c in sorted(candidates, key=lambda c: c.index) if c.ok]
        if not ok:
            msg = "there is no successful candidate to decide among"
            raise DecisionError(msg)
        sink = emit or events.event_sink()
        context = SelectionContext(conversation, ok, config=config, caller=caller)
        sink(events.decision_started(self.strategy, self.method))
        with current_hooks().decision(self.strategy, self.method, ok) as done:
            start = time.perf_counter()
            try:
                message, decision = await self.attempt(context, on_token=on_token)
            except (GraphBubbleUp, CallAborted):
                raise  # LangGraph control flow or Ctrl-C: not a failure of the decision
            except Exception as exc:
                message, decision = await self._fall_back(context, exc)
            decision = decision.model_copy(update={"latency_s": time.perf_counter() - start})
            if decision.fused or decision.fallback:  # a selected answer is left as it was
                message = _annotated(message, decision)
            done(decision, message)
        if decision.fallback:
            logger.warning(
                "%s fell back to %s: %s", self.method, decision.method, decision.fallback_reason
            )
        sink(events.decision_made(decision))
        return message, decision

    async def _fall_back(
        self, context: SelectionContext, failure: Exception
    ) -> tuple[AIMessage, Decision]:
        what = "fusor" if self.strategy == "fusion" else "selector"
        if self.fallback is None:
            msg = f"the {what} ({self.method}) failed: {type(failure).__name__}: {failure}"
            raise DecisionError(msg) from failure
        try:
            selection = await self.fallback.select(context)
            chosen = winner(context.candidates, selection.index)
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
        )
        assert chosen.message is not None
        return chosen.message, decision


def _annotated(message: AIMessage, decision: Decision) -> AIMessage:
    """The answer, with how it was decided in its ``response_metadata`` (a copy: the
    candidate's own message is left as it was)."""
    note = {
        "strategy": decision.strategy,
        "method": decision.method,
        "fused": decision.fused,
        "selected_index": decision.selected_index,
        "fallback": decision.fallback,
        "fallback_reason": decision.fallback_reason,
    }
    metadata = {**message.response_metadata, DECISION_METADATA_KEY: note}
    return message.model_copy(update={"response_metadata": metadata})
