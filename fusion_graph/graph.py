"""``create_fusion_graph``: Best-of-N / Fusion-of-N as a reusable LangGraph subgraph."""

from __future__ import annotations

from typing import Any, Unpack

from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langgraph.graph import END, START, StateGraph

from fusion_graph.messages import state_messages
from fusion_graph.nodes.decide import Selector
from fusion_graph.nodes.select import RewardFn
from fusion_graph.options import FusionOptions
from fusion_graph.prompts import FUSION_PROMPT, PromptTemplate
from fusion_graph.runtime import run_sync
from fusion_graph.state import FusionState
from fusion_graph.step import FusionStep
from fusion_graph.types import Strategy
from fusion_graph.wrap import StepOptions


def _generate_node(step: FusionStep) -> Runnable[FusionState, dict[str, Any]]:
    def source(state: FusionState) -> Any:
        return state if step.is_node else state_messages(state)

    def generate(state: FusionState, config: RunnableConfig) -> dict[str, Any]:
        conversation = state_messages(state)
        made = run_sync(lambda: step.generate(source(state), conversation, config, sync=True))
        return {"candidates": [c.to_plain() for c in made]}

    async def agenerate(state: FusionState, config: RunnableConfig) -> dict[str, Any]:
        conversation = state_messages(state)
        made = await step.generate(source(state), conversation, config, sync=False)
        return {"candidates": [c.to_plain() for c in made]}

    return RunnableLambda(generate, afunc=agenerate, name="generate")


def _decide_node(step: FusionStep, name: str) -> Runnable[FusionState, dict[str, Any]]:
    def decide(state: FusionState, config: RunnableConfig) -> dict[str, Any]:
        conversation, candidates = state_messages(state), state["candidates"]
        message, decision = run_sync(
            lambda: step.decide(conversation, candidates, config, sync=True)
        )
        return {"messages": [message], "decision": decision.to_plain()}

    async def adecide(state: FusionState, config: RunnableConfig) -> dict[str, Any]:
        conversation, candidates = state_messages(state), state["candidates"]
        message, decision = await step.decide(conversation, candidates, config, sync=False)
        return {"messages": [message], "decision": decision.to_plain()}

    return RunnableLambda(decide, afunc=adecide, name=name)


def create_fusion_graph(
    step: Any,
    *,
    n: int,
    strategy: Strategy,
    fusor: Runnable[Any, Any] | None = None,
    prompt: PromptTemplate = FUSION_PROMPT,
    selector: Selector | RewardFn | None = None,
    **options: Unpack[StepOptions],
) -> StateGraph[FusionState, None, FusionState, FusionState]:
    """Best-of-N / Fusion-of-N as an **uncompiled** ``StateGraph`` (bring your own
    checkpointer): ``START -> generate -> fuse | select -> END``.

    The state is ``MessagesState``-compatible: ``messages`` in, the final ``AIMessage``
    appended. ``candidates`` (every candidate, index order, failures included) and
    ``decision`` stay in state, and so in the checkpointer: if the decision step fails,
    resuming the thread re-runs only the decision, never the candidates.

    Args:
        step: A chat model / Runnable, a node function, or a list of them (a pool).
        n: How many candidates.
        strategy: ``"fusion"`` (needs ``fusor``) or ``"best_of_n"`` (needs ``selector``).
        fusor, prompt, selector, **options: as for :func:`~fusion_graph.fusion_of_n` /
            :func:`~fusion_graph.best_of_n`.

    Example:
        >>> graph = create_fusion_graph(llm, n=5, strategy="fusion", fusor=llm)  # doctest: +SKIP
        >>> out = graph.compile().invoke({"messages": [("user", "Hi")]})  # doctest: +SKIP
        >>> out["messages"][-1], out["candidates"], out["decision"]  # doctest: +SKIP
    """
    built = FusionStep.build(
        step,
        FusionOptions(
            n=n, strategy=strategy, fusor=fusor, prompt=prompt, selector=selector, **options
        ),
    )
    decide_name = "fuse" if strategy == "fusion" else "select"
    builder = StateGraph(FusionState)
    builder.add_node("generate", _generate_node(built))
    builder.add_node(decide_name, _decide_node(built, decide_name))
    builder.add_edge(START, "generate")
    builder.add_edge("generate", decide_name)
    builder.add_edge(decide_name, END)
    return builder
