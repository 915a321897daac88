"""create_agent + FusionMiddleware on the real embedded model (SmolLM2-135M on llama.cpp)."""

from __future__ import annotations

from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from fusion_graph.integrations.llama_cpp import ChatLocalModel
from fusion_graph.middleware import FusionMiddleware

pytestmark = pytest.mark.integration

RAN: list[tuple[float, float]] = []


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    RAN.append((a, b))
    return a * b


def _agent() -> Any:
    llm = ChatLocalModel(max_tokens=48, temperature=0.7, seed=3)
    return create_agent(llm, [multiply], middleware=[FusionMiddleware(n=2, fusor=llm)])


def _check(out: dict[str, Any]) -> None:
    fused_calls = [c for m in out["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]
    assert len(RAN) == len(fused_calls)  # the answer's calls ran, each once; no candidate's
    assert len(out["fusion_candidates"]) == 2
    assert out["fusion_decision"].strategy == "fusion"


def test_create_agent_with_fusion_on_the_embedded_model() -> None:
    RAN.clear()
    out = _agent().invoke(
        {"messages": [("user", "What is 12.5 times 4? Use the multiply tool.")]},
        {"recursion_limit": 6},
    )
    _check(out)


async def test_create_agent_with_fusion_async_on_the_embedded_model() -> None:
    RAN.clear()
    out = await _agent().ainvoke(
        {"messages": [("user", "What is 3 times 5?")]}, {"recursion_limit": 6}
    )
    _check(out)


def test_bind_tools_replies_always_parse() -> None:
    llm = ChatLocalModel(max_tokens=48, temperature=0.7).bind_tools(
        [multiply], tool_choice="multiply"
    )
    message = llm.invoke("What is 6 times 7?", seed=1)
    assert message.tool_calls and message.tool_calls[0]["name"] == "multiply"
    assert set(message.tool_calls[0]["args"]) <= {"a", "b"}
