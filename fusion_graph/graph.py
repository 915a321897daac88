"""``create_fusion_graph``: Best-of-N / Fusion-of-N as a reusable LangGraph subgraph."""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.types import RetryPolicy

from fusion_graph.engine import FusionEngine, build_engine
from fusion_graph.nodes.calls import run_sync
from fusion_graph.nodes.select import Selector
from fusion_graph.prompts import CRITIQUE_PROMPT, FUSION_PROMPT, PromptTemplate
from fusion_graph.state import FusionState, Strategy
from fusion_graph.wrap import state_messages


def _source(engine: FusionEngine, state: FusionState) -> Any:
    return state if engine.is_node else state_messages(state)


def _generate_node(engine: FusionEngine) -> Runnable[FusionState, dict[str, Any]]:
    def generate(state: FusionState, config: RunnableConfig) -> dict[str, Any]:
        conversation = state_messages(state)
        source = _source(engine, state)
        return {
            "candidates": run_sync(
                lambda: engine.generate_step(source, conversation, config, sync=True)
            )
        }

    async def agenerate(state: FusionState, config: RunnableConfig) -> dict[str, Any]:
        conversation = state_messages(state)
        source = _source(engine, state)
        return {"candidates": await engine.generate_step(source, conversation, config, sync=False)}

    return RunnableLambda(generate, afunc=agenerate, name="generate")


def _decide_node(engine: FusionEngine, name: str) -> Runnable[FusionState, dict[str, Any]]:
    def decide(state: FusionState, config: RunnableConfig) -> dict[str, Any]:
        conversation, candidates = state_messages(state), state["candidates"]
        message, decision = run_sync(
            lambda: engine.decide_step(conversation, candidates, config, sync=True)
        )
        return {"messages": [message], "decision": decision}

    async def adecide(state: FusionState, config: RunnableConfig) -> dict[str, Any]:
        conversation, candidates = state_messages(state), state["candidates"]
        message, decision = await engine.decide_step(conversation, candidates, config, sync=False)
        return {"messages": [message], "decision": decision}

    return RunnableLambda(decide, afunc=adecide, name=name)


def create_fusion_graph(
    *,
    generator: Any,
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
    prompt: PromptTemplate = FUSION_PROMPT,
    critique_prompt: PromptTemplate = CRITIQUE_PROMPT,
) -> StateGraph[FusionState, None, FusionState, FusionState]:
    """Best-of-N / Fusion-of-N as an **uncompiled** ``StateGraph`` (bring your own
    checkpointer): ``START -> generate -> fuse | select -> END``.

    The state is ``MessagesState``-compatible: ``messages`` in, the final ``AIMessage``
    appended. ``candidates`` (every candidate, index order, failures included) and
    ``decision`` stay in state, and so in the checkpointer: if the decision step fails,
    resuming the thread re-runs only the decision, never the candidates.

    Args:
        generator: A chat model / Runnable, a node function, or a list of them (a pool).
        n: How many candidates.
        strategy: ``"fusion"`` (needs ``fusor``) or ``"best_of_n"`` (needs ``selector``).
        Others: as for :func:`~fusion_graph.fusion_of_n` / :func:`~fusion_graph.best_of_n`.

    Example:
        >>> graph = create_fusion_graph(  # doctest: +SKIP
        ...     generator=llm, n=5, strategy="fusion", fusor=llm
        ... )
        >>> out = graph.compile().invoke({"messages": [("user", "Hi")]})  # doctest: +SKIP
        >>> out["messages"][-1], out["candidates"], out["decision"]  # doctest: +SKIP
    """
    engine = build_engine(
        generator,
        n=n,
        strategy=strategy,
        fusor=fusor,
        selector=selector,
        critic=critic,
        min_candidates=min_candidates,
        max_concurrency=max_concurrency,
        timeout=timeout,
        retry=retry,
        fallback=fallback,
        seed=seed,
        temperature=temperature,
        fusion_prompt=prompt,
        critique_prompt=critique_prompt,
    )
    decide_name = "fuse" if strategy == "fusion" else "select"
    builder = StateGraph(FusionState)
    builder.add_node("generate", _generate_node(engine))
    builder.add_node(decide_name, _decide_node(engine, decide_name))
    builder.add_edge(START, "generate")
    builder.add_edge("generate", decide_name)
    builder.add_edge(decide_name, END)
    return builder
