"""The graph state of :func:`~fusion_graph.create_fusion_graph` and its reducer."""

from __future__ import annotations

from typing import Annotated

from langgraph.graph import MessagesState

from fusion_graph.types import Candidate, Decision


def merge_candidates(
    current: list[Candidate] | None, update: list[Candidate] | Candidate | None
) -> list[Candidate]:
    """Reducer for ``candidates``: merge by index (a newer candidate replaces an older one
    with the same index) and keep index order, whatever order the writes arrive in."""
    if update is None:
        return list(current or [])
    updates = [update] if isinstance(update, Candidate) else update
    by_index = {c.index: c for c in current or []}
    by_index.update({c.index: c for c in updates})
    return [by_index[i] for i in sorted(by_index)]


class FusionState(MessagesState):
    """Graph state of :func:`~fusion_graph.create_fusion_graph`.

    ``MessagesState``-compatible: ``messages`` in, the final ``AIMessage`` appended.
    """

    candidates: Annotated[list[Candidate], merge_candidates]
    """Every candidate of the latest run, in index order, failures included."""
    decision: Decision | None
    """How the latest run decided."""
