"""The graph state of :func:`~fusion_graph.create_fusion_graph`, its reducer and channels.

In memory the state holds :class:`~fusion_graph.Candidate` and :class:`~fusion_graph.Decision`
objects; in a checkpoint it holds them as plain data (:meth:`Candidate.to_plain`), so that
LangGraph's default serializer restores them without "Deserializing unregistered type"
warnings and ``LANGGRAPH_STRICT_MSGPACK=true`` restores them at all. Use the channels in a
state schema of your own to keep candidates there (``candidates_key=`` of a wrapped node)::

    class State(MessagesState):
        candidates: Annotated[list[Candidate], CandidatesChannel]
        decision: Annotated[Decision | None, DecisionChannel]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from langgraph.channels import BinaryOperatorAggregate, LastValue
from langgraph.graph import MessagesState

from fusion_graph.types import Candidate, Decision

CandidateUpdate = list[Candidate] | Candidate | Sequence[dict[str, Any]] | None


def merge_candidates(current: list[Candidate] | None, update: CandidateUpdate) -> list[Candidate]:
    """Reducer for ``candidates``: merge by index (a newer candidate replaces an older one
    with the same index) and keep index order, whatever order the writes arrive in.
    Plain data (:meth:`Candidate.to_plain`) is accepted too."""
    if update is None:
        return list(current or [])
    updates = [update] if isinstance(update, Candidate) else update
    by_index = {c.index: c for c in current or []}
    for item in updates:
        candidate = Candidate.from_plain(item)
        by_index[candidate.index] = candidate
    return [by_index[i] for i in sorted(by_index)]


class CandidatesChannel(BinaryOperatorAggregate[list[Candidate]]):
    """A ``list[Candidate]`` channel merged by :func:`merge_candidates`, checkpointed as
    plain data."""

    def __init__(self, typ: Any = list, operator: Any = merge_candidates) -> None:
        super().__init__(typ, operator)

    def checkpoint(self) -> Any:
        value = super().checkpoint()
        return [c.to_plain() for c in value] if isinstance(value, list) else value

    def from_checkpoint(self, checkpoint: Any) -> CandidatesChannel:
        restored = super().from_checkpoint(checkpoint)
        if isinstance(restored.value, list):
            restored.value = [Candidate.from_plain(c) for c in restored.value]
        return restored


class DecisionChannel(LastValue[Decision | None]):
    """A ``Decision | None`` channel (last value wins), checkpointed as plain data."""

    def update(self, values: Sequence[Any]) -> bool:
        return super().update([None if v is None else Decision.from_plain(v) for v in values])

    def checkpoint(self) -> Any:
        value = super().checkpoint()
        return value.to_plain() if isinstance(value, Decision) else value

    def from_checkpoint(self, checkpoint: Any) -> DecisionChannel:
        restored = super().from_checkpoint(checkpoint)
        if isinstance(restored.value, dict):
            restored.value = Decision.from_plain(restored.value)
        return restored


class FusionState(MessagesState):
    """Graph state of :func:`~fusion_graph.create_fusion_graph`.

    ``MessagesState``-compatible: ``messages`` in, the final ``AIMessage`` appended.
    """

    candidates: Annotated[list[Candidate], CandidatesChannel]
    """Every candidate of the latest run, in index order, failures included."""
    decision: Annotated[Decision | None, DecisionChannel]
    """How the latest run decided."""
