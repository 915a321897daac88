"""Typed progress events of a run.

A run reports its progress as plain dicts (so they can go into LangGraph's ``custom``
stream as they are, and into JSON) typed by the :class:`~typing.TypedDict` s below. Pass an
``on_event`` callback to :meth:`FusionRunnable.run <fusion_graph.FusionRunnable.run>` (or
``arun``) to receive them; inside a LangGraph run they also go to the ``custom`` stream
mode (``graph.stream(..., stream_mode="custom")``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypedDict

from fusion_graph.types import Candidate, CandidateStatus, Decision, Strategy


class CandidateStarted(TypedDict):
    """A candidate's generation started."""

    event: Literal["candidate_started"]
    index: int
    model: str


class CandidateFinished(TypedDict):
    """A candidate finished (and was critiqued, if a critic is configured)."""

    event: Literal["candidate_finished"]
    index: int
    model: str
    ok: bool
    status: CandidateStatus
    """``"ok"``, ``"failed"``, or ``"cancelled"`` (by the run: grace, early stop, budget)."""
    latency_s: float
    output_tokens: int | None
    error: dict[str, str] | None
    """``{"type": ..., "message": ...}`` when the candidate failed or was cancelled."""
    critique_score: float | None


class DecisionStarted(TypedDict):
    """The fusor or selector started."""

    event: Literal["decision_started"]
    strategy: Strategy
    method: str


class DecisionMade(TypedDict):
    """The decision is made."""

    event: Literal["decision"]
    strategy: Strategy
    fused: bool
    selected_index: int | None
    score: float | None
    method: str
    fallback: bool
    fallback_reason: str | None
    latency_s: float


FusionEvent = CandidateStarted | CandidateFinished | DecisionStarted | DecisionMade
"""Any progress event; ``event["event"]`` says which."""

EventSink = Callable[[FusionEvent], Any]
"""Receives progress events."""


def candidate_started(index: int, model: str) -> CandidateStarted:
    return {"event": "candidate_started", "index": index, "model": model}


def candidate_finished(candidate: Candidate) -> CandidateFinished:
    usage = candidate.usage
    return {
        "event": "candidate_finished",
        "index": candidate.index,
        "model": candidate.model,
        "ok": candidate.ok,
        "status": candidate.status,
        "latency_s": round(candidate.latency_s, 4),
        "output_tokens": usage.output_tokens if usage else None,
        "error": candidate.error.model_dump() if candidate.error else None,
        "critique_score": next((c.score for c in candidate.critiques if c.score is not None), None),
    }


def decision_started(strategy: Strategy, method: str) -> DecisionStarted:
    return {"event": "decision_started", "strategy": strategy, "method": method}


def decision_made(decision: Decision) -> DecisionMade:
    return {
        "event": "decision",
        "strategy": decision.strategy,
        "fused": decision.fused,
        "selected_index": decision.selected_index,
        "score": decision.score,
        "method": decision.method,
        "fallback": decision.fallback,
        "fallback_reason": decision.fallback_reason,
        "latency_s": round(decision.latency_s, 4),
    }


def _ignore(_: FusionEvent) -> None:
    return None


def event_sink(on_event: EventSink | None = None) -> EventSink:
    """Where a run's events go: ``on_event`` and, inside a LangGraph run, the ``custom``
    stream; a no-op when neither is there."""
    try:
        from langgraph.config import get_stream_writer

        writer: EventSink | None = get_stream_writer()
    except (RuntimeError, KeyError):  # not inside a LangGraph run
        writer = None
    if on_event is None:
        return writer or _ignore
    if writer is None:
        return on_event

    def both(event: FusionEvent) -> None:
        on_event(event)
        writer(event)

    return both
