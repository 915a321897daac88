"""A run's token budget (``max_total_tokens``): once it is spent, no new call starts.

Every model call of a run (candidates, critiques, judge or fusor calls) goes through the
run's :class:`~fusion_graph.runtime.Caller`, which asks the budget before each attempt and
charges it with the usage the reply reports. A refused call fails with
:class:`BudgetSpentError`: a refused candidate is kept as a cancelled candidate
(``stopped="budget"``), a refused judge or fusor call makes the fallback decide, and the
decision says the budget bound the run (``Decision.stopped == "budget"``).

Calls already in flight when the budget runs out finish (their tokens are counted), so a
run can end above the budget by what those calls used: with all N candidates started at
once, the budget bounds what comes after them (critiques, judges, the rounds of an
early-stopping vote, retries), and ``max_concurrency`` makes it bound the candidates too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from langchain_core.messages import AIMessage
from langgraph.types import Command

from fusion_graph.errors import FusionGraphError
from fusion_graph.types import Candidate, TokenUsage, usage_by_stage

CostFn = Callable[[TokenUsage], float]
"""What one call costs against ``max_total_tokens``, from the usage its reply reports."""


def total_tokens(usage: TokenUsage) -> float:
    """The default cost of a call: its prompt plus generated tokens."""
    return float(usage.total_tokens)


class BudgetSpentError(FusionGraphError):
    """A call was not started because the run's token budget was spent."""


@dataclass
class Budget:
    """What one run may still spend (one per run; only its event loop touches it)."""

    limit: float
    """``max_total_tokens``, in the units of ``cost``."""
    cost: CostFn = total_tokens
    """The cost of one call."""
    spent: float = 0.0
    """What the run's finished calls cost so far."""
    refused: int = 0
    """How many calls were not started."""

    def check(self) -> None:
        """Raise :class:`BudgetSpentError` when nothing is left (and count the refusal)."""
        if self.spent >= self.limit:
            self.refused += 1
            msg = f"the run's token budget is spent ({self.spent:g} of {self.limit:g})"
            raise BudgetSpentError(msg)

    def charge(self, value: object) -> None:
        """Count what a finished call reports: a message, the samples of a multi-sample
        call, a node's update (or ``Command``) with its messages, or a structured output
        with its ``raw`` message."""
        for message in _ai_messages(value):
            if (usage := TokenUsage.of(message)) is not None:
                self.spent += self.cost(usage)

    def charge_made(self, candidates: Iterable[Candidate]) -> None:
        """Count candidates (and their critiques) made before this budget existed: restored
        on a resume, or made by the subgraph's generate node."""
        for usage in usage_by_stage(candidates, None).values():
            if usage is not None:
                self.spent += self.cost(usage)


def _ai_messages(value: object) -> list[AIMessage]:
    """The model replies in what a call returned."""
    if isinstance(value, AIMessage):
        return [value]
    if isinstance(value, list | tuple):
        return [m for item in value for m in _ai_messages(item)]
    if isinstance(value, Command):  # a node's update as a LangGraph Command
        return _ai_messages(value.update)
    if isinstance(value, dict):
        if "raw" in value:  # with_structured_output(include_raw=True)
            return _ai_messages(value["raw"])
        return _ai_messages(value.get("messages", []))
    return []
