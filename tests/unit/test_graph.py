"""The subgraph (create_fusion_graph), wrapped LangGraph nodes, and tool-calling steps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.errors import GraphBubbleUp
from langgraph.graph import END, START, MessagesState, StateGraph
from pydantic import SkipValidation

from fusion_graph import (
    Candidate,
    Decision,
    LLMJudge,
    MajorityVote,
    NotEnoughCandidatesError,
    best_of_n,
    create_fusion_graph,
    fusion_of_n,
)
from fusion_graph.testing import CallRecorder, FakeCall, FakeChatModel, tool_call
from tests.conftest import Mode, meeting_model


def _invoke(mode: Mode, graph: Any, value: Any, config: Any = None) -> Any:
    return mode.call(lambda: graph.invoke(value, config), lambda: graph.ainvoke(value, config))


def test_subgraph_is_uncompiled_and_keeps_everything_in_state(mode: Mode) -> None:
    rec = CallRecorder()
    builder = create_fusion_graph(
        meeting_model(3, rec, threads=mode.sync, replies=["a", "b", "c"]),
        n=3,
        strategy="fusion",
        fusor=FakeChatModel(replies=["fused"]),
    )
    assert isinstance(builder, StateGraph)
    out = _invoke(mode, builder.compile(), {"messages": [HumanMessage("q?")]})
    assert [m.content for m in out["messages"]] == ["q?", "fused"]
    assert [c.text for c in out["candidates"]] == ["a", "b", "c"]
    assert isinstance(out["candidates"][0], Candidate)
    assert isinstance(out["decision"], Decision) and out["decision"].fused
    assert rec.max_in_flight == 3


def test_subgraph_best_of_n(mode: Mode) -> None:
    builder = create_fusion_graph(
        FakeChatModel(replies=["7", "8", "7"]),
        n=3,
        strategy="best_of_n",
        selector=MajorityVote(),
    )
    out = _invoke(mode, builder.compile(), {"messages": [("user", "q?")]})
    assert out["messages"][-1].content == "7"
    assert out["decision"].selected_index == 0
    assert list(builder.nodes) == ["generate", "select"]


def test_subgraph_below_quorum_raises_but_candidates_are_checkpointed(mode: Mode) -> None:
    gen = FakeChatModel(replies=[RuntimeError("down")])
    graph = create_fusion_graph(gen, n=2, strategy="fusion", fusor=FakeChatModel())
    app = graph.compile(checkpointer=InMemorySaver())
    config: RunnableConfig = {"configurable": {"thread_id": "t"}}
    with pytest.raises(NotEnoughCandidatesError):
        _invoke(mode, app, {"messages": [("user", "q")]}, config)
    saved = app.get_state(config).values["candidates"]
    assert [c.error.type for c in saved] == ["RuntimeError", "RuntimeError"]


def test_subgraph_as_a_node_of_a_parent_graph(mode: Mode) -> None:
    fusion = create_fusion_graph(
        FakeChatModel(replies=["x", "y"]),
        n=2,
        strategy="fusion",
        fusor=FakeChatModel(replies=["fused answer"]),
    ).compile()

    def retrieve(state: MessagesState) -> dict[str, Any]:
        return {"messages": [HumanMessage("context: the docs say x")]}

    def format_answer(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage(f"Final: {state['messages'][-1].content}")]}

    parent = StateGraph(MessagesState)
    parent.add_node("retrieve", retrieve)
    parent.add_node("fusion", fusion)
    parent.add_node("format", format_answer)
    parent.add_edge(START, "retrieve")
    parent.add_edge("retrieve", "fusion")
    parent.add_edge("fusion", "format")
    parent.add_edge("format", END)
    out = _invoke(
        mode,
        parent.compile(checkpointer=InMemorySaver()),
        {"messages": [("user", "q")]},
        {"configurable": {"thread_id": "1"}},
    )
    assert [m.content for m in out["messages"]] == [
        "q",
        "context: the docs say x",
        "fused answer",
        "Final: fused answer",
    ]


# --- wrapped node functions ---------------------------------------------------------------


def _agent_graph(node: Any) -> Any:
    builder = StateGraph(MessagesState)
    builder.add_node("agent", node)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    return builder.compile(checkpointer=InMemorySaver())


def test_wrapped_sync_node_in_parent_graph_with_checkpointer(mode: Mode) -> None:
    rec = CallRecorder()
    llm = meeting_model(3, rec, threads=True, replies=["one", "two", "three"])  # a sync node

    def call_model(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"], config)]}

    node = fusion_of_n(call_model, n=3, fusor=FakeChatModel(replies=["fused"]))
    app = _agent_graph(node)
    config: RunnableConfig = {"configurable": {"thread_id": "a"}}
    out = _invoke(mode, app, {"messages": [("user", "hello")]}, config)
    assert [m.content for m in out["messages"]] == ["hello", "fused"]
    assert rec.max_in_flight == 3
    # The model inside the node saw the candidate index through the config.
    assert sorted(c.index for c in rec.by_role("generator")) == [0, 1, 2]
    # A second turn on the same thread sees the history.
    out = _invoke(mode, app, {"messages": [("user", "again")]}, config)
    assert [m.content for m in out["messages"]] == ["hello", "fused", "again", "fused"]


def test_wrapped_async_node_without_config_param(mode: Mode) -> None:
    rec = CallRecorder()
    llm = meeting_model(4, rec, threads=False, replies=["p", "q"])  # an async node

    async def call_model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    node = best_of_n(call_model, n=4, selector=lambda msgs, c: float(c.text == "q"))
    out = _invoke(
        mode,
        _agent_graph(node),
        {"messages": [("user", "hi")]},
        {"configurable": {"thread_id": "b"}},
    )
    assert out["messages"][-1].content == "q"
    assert rec.max_in_flight == 4
    # Without a config parameter the candidate index still reaches the model (context).
    assert sorted(c.index for c in rec.by_role("generator")) == [0, 1, 2, 3]


def test_wrapped_node_is_callable_like_the_node(mode: Mode) -> None:
    def call_model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage("hi")], "extra": 1}

    node = fusion_of_n(call_model, n=2, fusor=FakeChatModel(replies=["fused"]))
    update = node({"messages": [HumanMessage("q")]})
    assert update["extra"] == 1
    assert [m.content for m in update["messages"]] == ["fused"]
    assert node.name == "fusion_of_n(call_model)"


def test_node_without_ai_message_is_a_failed_candidate(mode: Mode) -> None:
    def broken(state: MessagesState) -> dict[str, Any]:
        return {"messages": []}

    node = fusion_of_n(broken, n=2, fusor=FakeChatModel())
    with pytest.raises(NotEnoughCandidatesError, match="0 of 2"):
        mode.call(
            lambda: node.invoke({"messages": [HumanMessage("q")]}),
            lambda: node.ainvoke({"messages": [HumanMessage("q")]}),
        )


# --- tool calls ----------------------------------------------------------------------------


def test_fusor_sees_tool_calls_and_may_answer_with_its_own(mode: Mode) -> None:
    rec = CallRecorder()
    replies = [
        AIMessage("", tool_calls=[tool_call("search", {"q": "paris weather"}, id="c0")]),
        AIMessage(
            "Let me look.", tool_calls=[tool_call("search", {"q": "weather Paris"}, id="c1")]
        ),
    ]
    fused_reply = AIMessage(
        "", tool_calls=[tool_call("search", {"q": "Paris weather today"}, id="f")]
    )
    fusor = FakeChatModel(replies=[fused_reply], recorder=rec).bind_tools(["search"])
    result = mode.run(fusion_of_n(FakeChatModel(replies=replies), n=2, fusor=fusor), "weather?")
    prompt = rec.by_role("fusor")[0].prompt
    assert 'Tool calls:\n- search({"q": "paris weather"})' in prompt
    assert '- search({"q": "weather Paris"})' in prompt
    assert rec.by_role("fusor")[0].kwargs["tools"] == ["search"]
    assert result.message.tool_calls == [fused_reply.tool_calls[0]]


def test_bon_keeps_winner_tool_calls_for_tool_node(mode: Mode) -> None:
    """Tool calls flow through intact, and fusion-graph itself never runs a tool."""
    calls = [tool_call("add", {"a": 1, "b": i}, id=f"id{i}") for i in range(3)]
    replies = [AIMessage("", tool_calls=[c]) for c in calls]
    judge = FakeChatModel(
        replies=lambda call: '{"score": 9}' if '"b": 2' in call.last else '{"score": 1}'
    )
    result = mode.run(
        best_of_n(FakeChatModel(replies=replies), n=3, selector=LLMJudge(judge)), "add"
    )
    assert result.message.tool_calls == [calls[2]]
    assert (
        result.message is result.candidates[2].message
        or result.message == result.candidates[2].message
    )


def test_tool_messages_in_history_reach_the_fusor(mode: Mode) -> None:
    rec = CallRecorder()
    history = [
        HumanMessage("weather?"),
        AIMessage("", tool_calls=[tool_call("search", {"q": "w"}, id="t1")]),
        ToolMessage("sunny, 21C", tool_call_id="t1", name="search"),
    ]
    fusor = FakeChatModel(replies=["It is sunny."], recorder=rec)
    mode.invoke(fusion_of_n(FakeChatModel(replies=["Sunny"]), n=2, fusor=fusor), history)
    sent = rec.by_role("fusor")[0].messages
    assert any(isinstance(m, ToolMessage) and m.content == "sunny, 21C" for m in sent)


def test_async_api_inside_running_loop_and_sync_api_from_async_code() -> None:
    fused = fusion_of_n(FakeChatModel(replies=["a"]), n=2, fusor=FakeChatModel(replies=["f"]))

    async def main() -> tuple[str, str]:
        a = await fused.ainvoke("q")
        b = fused.invoke("q")  # sync API called while a loop runs in this thread
        return str(a.content), str(b.content)

    assert asyncio.run(main()) == ("f", "f")


def test_candidates_of_a_failed_fusor_step_graph_resume_without_regenerating(mode: Mode) -> None:
    rec = CallRecorder()
    healthy = {"up": False}

    def fusor_reply(call: FakeCall) -> str | Exception:
        return "fused" if healthy["up"] else RuntimeError("fusor crashed")

    graph = create_fusion_graph(
        FakeChatModel(replies=["a", "b", "c"], recorder=rec),
        n=3,
        strategy="fusion",
        fusor=FakeChatModel(replies=fusor_reply, recorder=rec),
        fallback=None,
    )
    app = graph.compile(checkpointer=InMemorySaver())
    config: RunnableConfig = {"configurable": {"thread_id": "crash"}}
    with pytest.raises(Exception, match="fusor crashed"):
        _invoke(mode, app, {"messages": [("user", "q")]}, config)
    assert len(rec.by_role("generator")) == 3
    assert [c.text for c in app.get_state(config).values["candidates"]] == ["a", "b", "c"]
    healthy["up"] = True
    out = _invoke(mode, app, None, config)  # resume from the checkpoint
    assert out["messages"][-1].content == "fused"
    assert len(rec.by_role("generator")) == 3  # no candidate regenerated


class Overloaded(Exception):
    """An upstream failure of the caller's own type."""


def test_subgraph_quorum_error_carries_the_original_exceptions(mode: Mode) -> None:
    gen = FakeChatModel(replies=[Overloaded("busy")])
    app = create_fusion_graph(gen, n=2, strategy="fusion", fusor=FakeChatModel()).compile()
    caught: list[BaseException] = []
    try:
        _invoke(mode, app, {"messages": [("user", "q")]})
    except* Overloaded as group:  # as for a wrapped model's .invoke
        caught = list(group.exceptions)
    assert [type(e) for e in caught] == [Overloaded, Overloaded]
    assert [str(e) for e in caught] == ["busy", "busy"]


def test_subgraph_checkpoints_plain_data_and_history_restores_without_warnings(
    mode: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    graph = create_fusion_graph(
        FakeChatModel(replies=["a", "b", "a"]), n=3, strategy="best_of_n", selector=MajorityVote()
    )
    app = graph.compile(checkpointer=InMemorySaver())
    config: RunnableConfig = {"configurable": {"thread_id": "plain"}}
    _invoke(mode, app, {"messages": [("user", "q")]}, config)
    saved = app.checkpointer.get_tuple(config)  # type: ignore[union-attr]
    assert saved is not None
    values = saved.checkpoint["channel_values"]
    assert all(type(c) is dict for c in values["candidates"])
    assert type(values["decision"]) is dict
    with caplog.at_level("WARNING"):
        history = list(app.get_state_history(config))
    assert "unregistered" not in caplog.text
    latest = history[0].values
    assert [type(c) for c in latest["candidates"]] == [Candidate] * 3
    assert isinstance(latest["decision"], Decision)
    assert latest["decision"].selected_index == 0


class Crash(GraphBubbleUp):
    """Ends the run mid fan-out, like a crash (control flow: never a failed candidate)."""


class _Crashing(FakeChatModel):
    """While ``crashing``, raises :class:`Crash` once ``saved()`` says the other candidates
    are saved in the checkpointer; answers normally afterwards."""

    saved: SkipValidation[Callable[[], int]]
    wanted: int
    crashing: bool = True

    def _generate(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> Any:
        if self.crashing:
            deadline = time.monotonic() + 10  # so a fan-out that saves nothing fails, not hangs
            while self.saved() < self.wanted and time.monotonic() < deadline:
                time.sleep(0.005)
            raise Crash
        return super()._generate(messages, stop, run_manager, **kwargs)

    async def _agenerate(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> Any:
        if self.crashing:
            deadline = time.monotonic() + 10
            while self.saved() < self.wanted and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            raise Crash
        return await super()._agenerate(messages, stop, run_manager, **kwargs)


def _saved_candidates(saver: InMemorySaver, config: RunnableConfig) -> Callable[[], int]:
    """How many finished candidates the thread's latest checkpoint holds as task results."""

    def count() -> int:
        saved = saver.get_tuple(config)
        writes = saved.pending_writes if saved is not None else []
        return sum(len(value) for _, channel, value in writes or [] if isinstance(value, list))

    return count


def test_wrapped_model_in_a_checkpointed_node_resumes_only_unfinished_candidates(
    mode: Mode,
) -> None:
    saver = InMemorySaver()
    config: RunnableConfig = {"configurable": {"thread_id": f"model-{mode.name}"}}
    rec = CallRecorder()
    fast = FakeChatModel(replies=["Paris"], recorder=rec)
    crasher = _Crashing(
        replies=["Lyon"], recorder=rec, saved=_saved_candidates(saver, config), wanted=4
    )
    fused = best_of_n([fast, fast, crasher], n=6, selector=MajorityVote())  # 2 and 5 crash

    def node(state: MessagesState) -> dict[str, Any]:
        return {"messages": [fused.invoke(state["messages"])]}

    async def anode(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await fused.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", node if mode.sync else anode)
    builder.add_edge(START, "ask")
    app = builder.compile(checkpointer=saver)
    with pytest.raises(Crash):
        _invoke(mode, app, {"messages": [("user", "q")]}, config)
    made = sorted(c.index for c in rec.by_role("generator"))
    rec.calls.clear()
    crasher.crashing = False
    out = _invoke(mode, app, None, config)
    assert made == [0, 1, 3, 4]  # 2 and 5 crashed mid fan-out
    assert sorted(c.index for c in rec.by_role("generator")) == [2, 5]  # only the unfinished
    assert out["messages"][-1].content == "Paris"


def test_a_checkpointer_in_a_config_outside_a_graph_run_is_ignored(mode: Mode) -> None:
    from langgraph.constants import CONFIG_KEY_CHECKPOINTER

    fused = best_of_n(FakeChatModel(replies=["a", "b", "a"]), n=3, selector=MajorityVote())
    config: RunnableConfig = {"configurable": {CONFIG_KEY_CHECKPOINTER: InMemorySaver()}}
    assert mode.invoke(fused, "q", config).content == "a"  # no graph to save into: no journal
