"""Observation points of a run, for instrumentation (OpenTelemetry lives in
``fusion_graph.integrations.opentelemetry``).

The engine opens a scope around the run, each candidate, each critique and the
decision; model calls happen inside the scope, so anything an instrumentation makes
current there (an OpenTelemetry span) becomes the parent of the model's own traces. The
default hooks do nothing and cost one attribute lookup per scope.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from langchain_core.messages import AIMessage, BaseMessage

from fusion_graph.types import Candidate, Critique, Decision, Strategy

Phase = Literal["run", "generate", "decide"]
"""Which part of a run a run scope covers.

* ``"run"``: a whole wrapped call (``fusion_of_n(...).invoke``).
* ``"generate"``: the subgraph's ``generate`` node.
* ``"decide"``: the subgraph's ``fuse`` / ``select`` node.
"""


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    """What is known when a run starts."""

    phase: Phase
    """The part of the run this scope covers."""
    strategy: Strategy
    """``"fusion"`` or ``"best_of_n"``."""
    n: int
    """Number of candidates."""
    min_candidates: int
    """Successes needed."""
    method: str
    """The fusor or selector name."""
    models: tuple[str, ...]
    """The generator pool's model names."""
    conversation: Sequence[BaseMessage]
    """The input conversation (record it only when content capture is on)."""


@dataclass
class RunReport:
    """Filled in by the engine as the run goes; read by the hooks when the scope closes."""

    candidates: Sequence[Candidate] = ()
    decision: Decision | None = None
    answer: AIMessage | None = None


@dataclass(frozen=True, kw_only=True)
class CallInfo:
    """A candidate or critique call about to start."""

    index: int
    """The candidate index."""
    model: str
    """The model's name."""
    seed: int | None = None
    temperature: float | None = None


class RunHooks:
    """No-op hooks; an instrumentation subclasses this and overrides what it needs."""

    @contextmanager
    def run(self, info: RunInfo, report: RunReport) -> Iterator[None]:
        """Around a run (or a subgraph phase). Exceptions propagate through it."""
        yield

    @contextmanager
    def candidate(self, info: CallInfo) -> Iterator[Callable[[Candidate], None]]:
        """Around one candidate's generation; call the yielded function with the result."""
        yield _ignore

    @contextmanager
    def critique(self, info: CallInfo) -> Iterator[Callable[[Critique], None]]:
        """Around one critique; call the yielded function with the result."""
        yield _ignore

    @contextmanager
    def decision(
        self, strategy: Strategy, method: str, candidates: Sequence[Candidate]
    ) -> Iterator[Callable[[Decision, AIMessage], None]]:
        """Around the fusion or selection; call the yielded function with the outcome."""
        yield _ignore


def _ignore(*_: object) -> None:
    return None


_NO_HOOKS = RunHooks()
_active: RunHooks = _NO_HOOKS


def current_hooks() -> RunHooks:
    """The hooks runs report to now."""
    return _active


def set_hooks(hooks: RunHooks | None) -> None:
    """Install hooks for all runs (``None`` restores the no-op hooks)."""
    global _active
    _active = hooks if hooks is not None else _NO_HOOKS
