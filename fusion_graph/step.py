"""A Best-of-N / Fusion-of-N step: a fan-out and a decider, run together.

Every entry point is a thin shell over :class:`FusionStep`: the wrapped Runnable and node
(:mod:`fusion_graph.wrap`) run both phases in one call; the subgraph
(:mod:`fusion_graph.graph`) runs them as two nodes, so the candidates are checkpointed
before the decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import RunnableConfig

from fusion_graph.budget import Budget, BudgetSpentError
from fusion_graph.events import EventSink, event_sink
from fusion_graph.hooks import Phase, RunInfo, RunReport, current_hooks
from fusion_graph.nodes.decide import Decider, TokenSink
from fusion_graph.nodes.fanout import FanOut, Generated, check_quorum
from fusion_graph.nodes.generator import generator_pool
from fusion_graph.options import FusionOptions
from fusion_graph.runtime import Caller, reraise_aborted
from fusion_graph.types import Candidate, Decision, FusionResult, StopCause


@dataclass(frozen=True)
class FusionStep:
    """The validated options plus the two pieces built from them."""

    options: FusionOptions
    fan_out: FanOut
    decider: Decider

    @classmethod
    def build(cls, step: Any, options: FusionOptions) -> FusionStep:
        """The step that runs ``step`` (a model, a node function, or a pool of them)."""
        return cls(options, options.fan_out(generator_pool(step)), options.decider())

    @property
    def is_node(self) -> bool:
        return self.fan_out.is_node

    def caller(self, *, sync: bool) -> Caller:
        """The caller of one run: sync (``invoke`` on threads) or async (``ainvoke``)."""
        o = self.options
        return Caller.for_run(
            sync=sync,
            timeout=o.timeout,
            retry=o.retry,
            max_concurrency=o.max_concurrency,
            budget=o.budget(),
        )

    async def run(
        self,
        source: Any,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig,
        *,
        sync: bool,
        on_event: EventSink | None = None,
        on_token: TokenSink | None = None,
    ) -> FusionResult:
        """Both phases, as the wrapped Runnable and the wrapped node use them."""
        work = self._run(source, conversation, config, sync, on_event, on_token)
        return await (work if sync else reraise_aborted(work))

    async def _run(
        self,
        source: Any,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig,
        sync: bool,
        on_event: EventSink | None,
        on_token: TokenSink | None,
    ) -> FusionResult:
        emit = event_sink(on_event)
        caller = self.caller(sync=sync)
        report = RunReport()
        with current_hooks().run(self.run_info("run", conversation), report):
            made = await self.fan_out.generate(
                source, conversation, config, caller=caller, emit=emit
            )
            candidates = [g.candidate for g in made]
            report.candidates = candidates
            check_quorum(candidates, self.options.min_candidates)
            message, decision = await self.decider.run(
                conversation, candidates, config, caller, emit=emit, on_token=on_token
            )
            decision = with_stops(decision, candidates, caller.budget)
            report.decision, report.answer = decision, message
        update = _base_update(made, decision)
        return FusionResult(
            message=message, candidates=candidates, decision=decision, update=update
        )

    async def generate(
        self,
        source: Any,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig,
        *,
        sync: bool,
    ) -> list[Candidate]:
        """The subgraph's ``generate`` node."""
        work = self._generate(source, conversation, config, sync)
        return await (work if sync else reraise_aborted(work))

    async def _generate(
        self, source: Any, conversation: Sequence[BaseMessage], config: RunnableConfig, sync: bool
    ) -> list[Candidate]:
        report = RunReport()
        with current_hooks().run(self.run_info("generate", conversation), report):
            made = await self.fan_out.generate(
                source, conversation, config, caller=self.caller(sync=sync), save_last=False
            )
            report.candidates = [g.candidate for g in made]
        return list(report.candidates)

    async def decide(
        self,
        conversation: Sequence[BaseMessage],
        candidates: Sequence[Candidate],
        config: RunnableConfig,
        *,
        sync: bool,
    ) -> tuple[AIMessage, Decision]:
        """The subgraph's ``fuse`` / ``select`` node (checks the quorum first)."""
        work = self._decide(conversation, candidates, config, sync)
        return await (work if sync else reraise_aborted(work))

    async def _decide(
        self,
        conversation: Sequence[BaseMessage],
        candidates: Sequence[Candidate],
        config: RunnableConfig,
        sync: bool,
    ) -> tuple[AIMessage, Decision]:
        report = RunReport(candidates=candidates)
        caller = self.caller(sync=sync)
        if caller.budget is not None:  # what the generate node spent counts too
            caller.budget.charge_made(candidates)
        with current_hooks().run(self.run_info("decide", conversation), report):
            check_quorum(candidates, self.options.min_candidates)
            message, decision = await self.decider.run(conversation, candidates, config, caller)
            decision = with_stops(decision, candidates, caller.budget)
            report.decision, report.answer = decision, message
        return message, decision

    def run_info(self, phase: Phase, conversation: Sequence[BaseMessage]) -> RunInfo:
        """What the hooks learn when a run (or a subgraph phase) starts."""
        return RunInfo(
            phase=phase,
            strategy=self.options.strategy,
            n=self.options.n,
            min_candidates=self.options.min_candidates,
            method=self.decider.method,
            models=tuple(g.name for g in self.fan_out.generators),
            conversation=conversation,
        )


def with_stops(
    decision: Decision, candidates: Sequence[Candidate], budget: Budget | None
) -> Decision:
    """The decision, saying what cut the run short (a spent budget, a settled vote, the
    grace window), if anything did; with several causes, each reason is given and
    ``stopped`` names the first of budget, early stop, grace."""
    reasons: dict[StopCause, str] = {}
    refused_critiques = any(
        k.error is not None and k.error.type == BudgetSpentError.__name__
        for c in candidates
        for k in c.critiques
    )
    if (budget is not None and budget.refused) or refused_critiques:
        assert budget is not None
        spent = f"the token budget was spent ({budget.spent:g} of {budget.limit:g})"
        refused = f": {budget.refused} call(s) not started" if budget.refused else ""
        reasons["budget"] = spent + refused
    for candidate in candidates:
        if candidate.stopped is not None and candidate.stopped not in reasons:
            reasons[candidate.stopped] = candidate.error.message if candidate.error else ""
    if not reasons:
        return decision
    cause = next(c for c in ("budget", "early_stop", "grace") if c in reasons)
    used = sum(c.attempts > 0 for c in candidates)
    update = {"stopped": cause, "stop_reason": "; ".join(reasons.values()), "samples_used": used}
    return decision.model_copy(update=update)


def _base_update(made: Sequence[Generated], decision: Decision) -> dict[str, Any] | None:
    """For a wrapped node: the winner's update, or (fused) the first successful one's."""
    ok = [g for g in made if g.candidate.ok and g.update is not None]
    if not ok:
        return None
    if decision.selected_index is not None:
        for generated in ok:
            if generated.candidate.index == decision.selected_index:
                return generated.update
    return ok[0].update
