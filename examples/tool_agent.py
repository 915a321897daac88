"""A tool-using agent whose model step is wrapped with Fusion-of-N: each turn N candidate
model calls -> one fused AIMessage (text and/or tool calls) -> the tools run once, for the
fused calls only (LangGraph's ToolNode), never N times.

    python examples/tool_agent.py --base-url http://127.0.0.1:8000/v1 --model NAME
    python examples/tool_agent.py      # embedded model: JSON-grammar tool calls, demo grade

Wrapping a whole compiled agent (``fusion_of_n(agent, ...)``) is refused: each candidate
would run its own tools, so their side effects would happen N times. Wrap the model step
as here, or use ``FusionMiddleware`` with ``create_agent`` (examples/create_agent.py).
"""

from __future__ import annotations

from typing import Any

from _common import chat_model, parser
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from fusion_graph import fusion_of_n

CALLS: list[str] = []


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    CALLS.append(f"multiply({a}, {b})")
    return a * b


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__ or "").parse_args(argv)
    llm = chat_model(args)
    try:
        model = llm.bind_tools([multiply])
    except NotImplementedError:
        print("(this model cannot call tools: the agent will answer in text)")
        model = llm

    def call_model(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"], config)]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", fusion_of_n(call_model, n=args.n, fusor=model))
    builder.add_node("tools", ToolNode([multiply]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    agent = builder.compile()

    out = agent.invoke(
        {"messages": [("user", "What is 12.5 times 4? Use the multiply tool.")]},
        {"recursion_limit": 12},
    )
    print(f"tool calls executed: {CALLS or 'none'}")
    print(out["messages"][-1].text)


if __name__ == "__main__":
    main()
