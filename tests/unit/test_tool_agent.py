"""A ReAct agent (model node + LangGraph's ToolNode) whose model step is wrapped: each turn
N candidates -> one fused or selected AIMessage -> the tools run once, for that message."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from fusion_graph import MajorityVote, best_of_n, fusion_of_n
from fusion_graph.testing import CallRecorder, FakeCall, FakeChatModel, tool_call
from tests.conftest import Mode


def _agent(wrap: str, side_effects: list[str], rec: CallRecorder) -> Any:
    @tool
    def book_table(restaurant: str, people: int) -> str:
        """Book a table (a side effect that must happen once)."""
        side_effects.append(f"{restaurant}:{people}")
        return f"booked {restaurant} for {people}"

    def policy(call: FakeCall) -> AIMessage:
        # Before the tool ran: propose a booking (candidates disagree on the details);
        # after: answer in text, which ends the loop.
        if any(isinstance(m, ToolMessage) for m in call.messages):
            return AIMessage(f"Done: {call.messages[-1].content}.")
        people = 2 if (call.index or 0) % 3 else 4
        args = {"restaurant": "Chez Paul", "people": people}
        return AIMessage("", tool_calls=[tool_call("book_table", args, id=f"c{call.index}")])

    llm = FakeChatModel(replies=policy, recorder=rec, model_name="agent-llm").bind_tools(
        [book_table]
    )

    def call_model(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"], config)]}

    def fused_policy(call: FakeCall) -> AIMessage:
        results = [m for m in call.messages if isinstance(m, ToolMessage)]
        if results:
            return AIMessage(f"Done: {results[-1].content}.")
        args = {"restaurant": "Chez Paul", "people": 2}
        return AIMessage("", tool_calls=[tool_call("book_table", args, id="fused")])

    fusor = FakeChatModel(replies=fused_policy, recorder=rec).bind_tools([book_table])
    node = (
        fusion_of_n(call_model, n=5, fusor=fusor)
        if wrap == "fusion"
        else best_of_n(call_model, n=5, selector=MajorityVote())
    )
    builder = StateGraph(MessagesState)
    builder.add_node("agent", node)
    builder.add_node("tools", ToolNode([book_table]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=InMemorySaver())


@pytest.mark.parametrize("wrap", ["fusion", "best_of_n"])
def test_tools_run_once_per_turn_and_the_loop_ends(mode: Mode, wrap: str) -> None:
    side_effects: list[str] = []
    rec = CallRecorder()
    app = _agent(wrap, side_effects, rec)
    value = {"messages": [("user", "Book Chez Paul for two")]}
    config: RunnableConfig = {"configurable": {"thread_id": wrap}, "recursion_limit": 10}
    out = mode.call(lambda: app.invoke(value, config), lambda: app.ainvoke(value, config))

    # Two model turns of 5 candidates each, one tool execution in between.
    assert len(rec.by_role("generator")) == 10
    assert side_effects == ["Chez Paul:2"]
    tool_messages = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert [m.content for m in tool_messages] == ["booked Chez Paul for 2"]
    final = out["messages"][-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.content == "Done: booked Chez Paul for 2."
    # The tool call that ran is the fused one, or the majority's (ids intact).
    expected_id = "fused" if wrap == "fusion" else "c1"
    assert tool_messages[0].tool_call_id == expected_id
