"""Agents as people build them: the create_agent middleware, a wrapped model inside agent
constructors, LangGraph node signatures, control flow (interrupt, Command) and state keys.

Fakes answer by candidate index and role (fusion-graph tags every call), never by count.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AIMessageChunk, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.errors import GraphInterrupt
from langgraph.graph import END, START, MessagesState, StateGraph, add_messages
from langgraph.prebuilt import create_react_agent
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt
from pydantic import BaseModel

from fusion_graph import Candidate, Decision, MajorityVote, best_of_n, fusion_of_n
from fusion_graph.middleware import BestOfNMiddleware, FusionMiddleware
from fusion_graph.runtime import INDEX_KEY, ROLE_KEY
from fusion_graph.testing import CallRecorder, FakeCall, FakeChatModel, tool_call

RAN: list[tuple[float, float]] = []


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    RAN.append((a, b))
    return a * b


@tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@pytest.fixture(autouse=True)
def _clear() -> None:
    RAN.clear()


def agent_reply(call: FakeCall) -> str | AIMessage:
    """Candidates call multiply(index, 4); the fusor calls multiply(3, 4); after the tool
    result everyone answers in words."""
    if any(isinstance(m, ToolMessage) for m in call.messages):
        return f"final answer from {call.role} {call.index}"
    a = 3 if call.role == "fusor" else call.index
    return AIMessage("", tool_calls=[tool_call("multiply", {"a": a, "b": 4})])


def thread(name: str) -> RunnableConfig:
    return {"configurable": {"thread_id": name}}


# -- create_agent + middleware ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_fusion_middleware_runs_the_fused_tool_call_once(mode: str) -> None:
    rec = CallRecorder()
    model = FakeChatModel(replies=agent_reply, recorder=rec)
    agent = create_agent(
        model, [multiply, add], middleware=[FusionMiddleware(n=3)], checkpointer=InMemorySaver()
    )
    question = {"messages": [("user", "What is 3 times 4?")]}
    if mode == "sync":
        out = agent.invoke(question, thread("t"))
    else:
        out = asyncio.run(agent.ainvoke(question, thread("t")))
    assert RAN == [(3.0, 4.0)]  # the fused call only, once
    generators = rec.by_role("generator")
    assert len(generators) == 6 and len(rec.by_role("fusor")) == 2  # 2 model steps
    assert sorted(c.index for c in generators[:3]) == [0, 1, 2]
    assert all(sorted(c.kwargs["tools"]) == ["add", "multiply"] for c in rec.calls)
    seeds = [c.kwargs["seed"] for c in generators[:3]]
    assert len(set(seeds)) == 3  # own seed per candidate, through model_settings
    assert out["messages"][-1].content == "final answer from fusor None"
    candidates = out["fusion_candidates"]
    assert [c.text for c in candidates] == [f"final answer from generator {i}" for i in range(3)]
    assert isinstance(candidates[0], Candidate) and isinstance(out["fusion_decision"], Decision)
    assert out["fusion_decision"].fused
    # the checkpointer stores them
    saved = agent.get_state(thread("t")).values
    assert saved["fusion_decision"].fused and len(saved["fusion_candidates"]) == 3


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_best_of_n_middleware_returns_the_winner_untouched(mode: str) -> None:
    def reply(call: FakeCall) -> str | AIMessage:
        if any(isinstance(m, ToolMessage) for m in call.messages):
            return "twelve" if call.index != 1 else "eleven"
        b = 4 if call.index != 2 else 5
        return AIMessage("", tool_calls=[tool_call("multiply", {"a": 3, "b": b})])

    rec = CallRecorder()
    agent = create_agent(
        FakeChatModel(replies=reply, recorder=rec),
        [multiply],
        middleware=[BestOfNMiddleware(n=3, selector=MajorityVote())],
    )
    question = {"messages": [("user", "3 times 4?")]}
    out = agent.invoke(question) if mode == "sync" else asyncio.run(agent.ainvoke(question))
    assert RAN == [(3.0, 4.0)]
    assert len(rec.by_role("generator")) == 6 and not rec.by_role("fusor")
    assert out["messages"][-1].content == "twelve"
    assert out["fusion_decision"].selected_index in (0, 2)


def test_only_the_final_answer_streams_in_messages_mode() -> None:
    agent = create_agent(
        FakeChatModel(replies=agent_reply), [multiply], middleware=[FusionMiddleware(n=3)]
    )
    streamed: list[tuple[Any, dict[str, Any]]] = []
    custom: list[Any] = []
    for mode, chunk in agent.stream(
        {"messages": [("user", "3 times 4?")]}, stream_mode=["messages", "custom"]
    ):
        (streamed if mode == "messages" else custom).append(chunk)
    model_chunks = [(m, meta) for m, meta in streamed if meta.get("langgraph_node") == "model"]
    assert model_chunks and all(meta.get(ROLE_KEY) == "fusor" for _, meta in model_chunks)
    text = "".join(str(m.content) for m, _ in model_chunks if isinstance(m, AIMessageChunk))
    assert "final answer from fusor None" in text
    assert "generator" not in text
    assert RAN == [(3.0, 4.0)]
    kinds = [e.get("event") for e in custom if isinstance(e, dict)]
    assert kinds.count("candidate_finished") == 6 and kinds.count("decision") == 2


async def test_middleware_streams_async() -> None:
    agent = create_agent(
        FakeChatModel(replies=agent_reply), [multiply], middleware=[FusionMiddleware(n=2)]
    )
    roles = [
        meta.get(ROLE_KEY)
        async for m, meta in agent.astream(
            {"messages": [("user", "3 times 4?")]}, stream_mode="messages"
        )
        if meta.get("langgraph_node") == "model"
    ]
    assert roles and set(roles) == {"fusor"}
    assert RAN == [(3.0, 4.0)]


def test_middleware_with_a_separate_fusor_and_temperature() -> None:
    rec = CallRecorder()
    fusor = FakeChatModel(replies=agent_reply, recorder=rec, model_name="fusor-model")
    agent = create_agent(
        FakeChatModel(replies=agent_reply, recorder=rec),
        [multiply],
        middleware=[FusionMiddleware(n=2, fusor=fusor, temperature=0.3, seed=10)],
    )
    out = agent.invoke({"messages": [("user", "3 times 4?")]})
    generators = rec.by_role("generator")
    assert [c.kwargs["seed"] for c in generators[:2]] == [10, 11]
    assert all(c.kwargs["temperature"] == 0.3 for c in generators)
    assert out["fusion_decision"].method == "fusion:fusor-model"
    assert rec.by_role("fusor")[0].kwargs["tools"] == ["multiply"]  # bound to the tools


def test_middleware_structured_response() -> None:
    class Answer(BaseModel):
        value: float

    def reply(call: FakeCall) -> AIMessage:
        value = 12.0 if call.role == "fusor" else float(call.index or 0)
        return AIMessage("", tool_calls=[tool_call("Answer", {"value": value})])

    agent = create_agent(
        FakeChatModel(replies=reply), [], response_format=Answer, middleware=[FusionMiddleware(n=2)]
    )
    out = agent.invoke({"messages": [("user", "3 times 4?")]})
    assert out["structured_response"] == Answer(value=12.0)


def test_call_limit_counts_a_fused_step_once() -> None:
    from langchain.agents.middleware import ModelCallLimitMiddleware

    agent = create_agent(
        FakeChatModel(replies=agent_reply),
        [multiply],
        middleware=[ModelCallLimitMiddleware(run_limit=2), FusionMiddleware(n=4)],
    )
    out = agent.invoke({"messages": [("user", "3 times 4?")]})
    assert out["messages"][-1].content == "final answer from fusor None"


# -- a wrapped model inside agent constructors -------------------------------------------------


@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")
def test_create_react_agent_with_a_wrapped_model() -> None:
    rec = CallRecorder()
    model = FakeChatModel(replies=agent_reply, recorder=rec)
    agent = create_react_agent(fusion_of_n(model, n=4, fusor=model), [multiply])
    out = agent.invoke({"messages": [("user", "3 times 4?")]})
    assert RAN == [(3.0, 4.0)]
    assert len(rec.by_role("generator")) == 8
    assert all(c.kwargs.get("tools") == ["multiply"] for c in rec.calls)
    assert out["messages"][-1].content == "final answer from fusor None"


def test_create_agent_with_a_wrapped_model() -> None:
    model = FakeChatModel(replies=agent_reply)
    agent = create_agent(best_of_n(model, n=3, selector=MajorityVote()), [multiply])
    out = agent.invoke({"messages": [("user", "3 times 4?")]})
    assert len(RAN) == 1
    assert out["messages"][-1].content.startswith("final answer from generator")


def test_bind_tools_binds_candidates_and_fusor() -> None:
    rec = CallRecorder()
    model = FakeChatModel(replies=["a", "b"], recorder=rec)
    fused = fusion_of_n(model, n=2, fusor=model).bind_tools([multiply], tool_choice="auto")
    fused.invoke("hi")
    assert len(rec.calls) == 3
    assert all(c.kwargs["tools"] == ["multiply"] for c in rec.calls)
    assert all(c.kwargs["tool_choice"] == "auto" for c in rec.calls)
    rec.calls.clear()
    best_of_n(model, n=2, selector=MajorityVote()).bind_tools([multiply]).invoke("hi")
    assert all(c.kwargs["tools"] == ["multiply"] for c in rec.calls)


def test_bind_tools_refuses_a_model_without_tools() -> None:
    from langchain_core.runnables import RunnableLambda

    fused = fusion_of_n(RunnableLambda(lambda _: AIMessage("x")), n=2, fusor=FakeChatModel())
    with pytest.raises(TypeError, match="has no bind_tools"):
        fused.bind_tools([multiply])


@pytest.mark.parametrize("strategy", ["fusion", "best_of_n"])
def test_with_structured_output(strategy: str) -> None:
    class Answer(BaseModel):
        value: int

    def reply(call: FakeCall) -> AIMessage:
        value = 7 if call.role == "fusor" else 4
        return AIMessage("", tool_calls=[tool_call("Answer", {"value": value})])

    rec = CallRecorder()
    model = FakeChatModel(replies=reply, recorder=rec)
    wrapped = (
        fusion_of_n(model, n=3, fusor=model)
        if strategy == "fusion"
        else best_of_n(model, n=3, selector=MajorityVote())
    )
    result = wrapped.with_structured_output(Answer).invoke("3 + 4?")
    assert result == Answer(value=7 if strategy == "fusion" else 4)
    assert all(c.kwargs["tool_choice"] == "Answer" for c in rec.calls)
    raw = wrapped.with_structured_output(Answer, include_raw=True).invoke("3 + 4?")
    assert isinstance(raw["raw"], AIMessage) and raw["parsing_error"] is None
    with pytest.raises(TypeError, match="takes schema and include_raw only"):
        wrapped.with_structured_output(Answer, method="json_mode")


async def test_call_options_reach_every_candidate_and_the_fusor() -> None:
    rec = CallRecorder()
    model = FakeChatModel(replies=["a", "b"], recorder=rec)
    fused = fusion_of_n(model, n=2, fusor=model)
    fused.invoke("hi", max_tokens=5)
    assert len(rec.calls) == 3 and all(c.kwargs["max_tokens"] == 5 for c in rec.calls)
    rec.calls.clear()
    await fused.bind(max_tokens=7).ainvoke("hi")
    assert all(c.kwargs["max_tokens"] == 7 for c in rec.calls)
    rec.calls.clear()
    fused.bind(seed=100, temperature=0.2).invoke("hi")
    generators = rec.by_role("generator")
    assert sorted(c.kwargs["seed"] for c in generators) == [100, 101]
    assert all(c.kwargs["temperature"] == 0.2 for c in generators)
    rec.calls.clear()
    list(fused.stream("hi", max_tokens=3))
    assert all(c.kwargs["max_tokens"] == 3 for c in rec.calls)


def test_stop_reaches_every_call() -> None:
    seen: list[Any] = []

    class StopFake(FakeChatModel):
        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any):  # type: ignore[no-untyped-def]
            seen.append(stop)
            return super()._generate(messages, stop, run_manager, **kw)

    model = StopFake(replies=["a"])
    fusion_of_n(model, n=2, fusor=model).invoke("hi", stop=["\n"])
    assert seen == [["\n"]] * 3


@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")
def test_a_compiled_agent_is_refused_with_what_to_wrap() -> None:
    agent = create_react_agent(FakeChatModel(), [multiply])
    with pytest.raises(TypeError, match="FusionMiddleware"):
        fusion_of_n(agent, n=3, fusor=FakeChatModel())


# -- LangGraph node signatures -----------------------------------------------------------------


@dataclass
class Ctx:
    user: str


class NodeState(TypedDict):
    messages: Annotated[list[Any], add_messages]
    candidates: list[Candidate]


def _graph(node: Any) -> Any:
    builder = StateGraph(NodeState, context_schema=Ctx)
    fused = fusion_of_n(
        node, n=2, fusor=FakeChatModel(replies=["fused"]), candidates_key="candidates"
    )
    builder.add_node("agent", fused)
    builder.add_edge(START, "agent")
    return builder.compile()


def _runtime_node(state: MessagesState, runtime: Runtime[Ctx]) -> dict[str, Any]:
    return {"messages": [AIMessage(f"hello {runtime.context.user}")]}


def _kw_runtime_node(state: MessagesState, *, runtime: Runtime[Ctx]) -> dict[str, Any]:
    return {"messages": [AIMessage(f"hi {runtime.context.user}")]}


async def _async_runtime_node(state: MessagesState, runtime: Runtime[Ctx]) -> dict[str, Any]:
    return {"messages": [AIMessage(f"hey {runtime.context.user}")]}


def _config_node(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
    return {"messages": [AIMessage(f"index {config['metadata'][INDEX_KEY]}")]}


def _writer_node(state: MessagesState, *, writer: Any, store: Any) -> dict[str, Any]:
    writer({"from": "node"})
    return {"messages": [AIMessage(f"store {store is None}")]}


@pytest.mark.parametrize(
    ("node", "text"),
    [
        (_runtime_node, "hello ada"),
        (_kw_runtime_node, "hi ada"),
        (_async_runtime_node, "hey ada"),
        (_config_node, "index "),
        (_writer_node, "store True"),
    ],
)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_node_signatures(node: Any, text: str, mode: str) -> None:
    graph = _graph(node)
    inputs = {"messages": [("user", "hi")]}
    if mode == "sync":
        out = graph.invoke(inputs, context=Ctx(user="ada"))
    else:
        out = asyncio.run(graph.ainvoke(inputs, context=Ctx(user="ada")))
    assert all(c.ok for c in out["candidates"]), [c.error for c in out["candidates"]]
    assert all(c.text.startswith(text) for c in out["candidates"])
    assert out["messages"][-1].content == "fused"


def test_a_runtime_node_outside_a_graph_gets_an_empty_runtime() -> None:
    def node(state: Any, *, runtime: Runtime[None]) -> dict[str, Any]:
        return {"messages": [AIMessage(f"context {runtime.context}")]}

    out = fusion_of_n(node, n=2, fusor=FakeChatModel(replies=["fused"])).invoke(
        {"messages": [("user", "hi")]}
    )
    assert out["messages"][-1].content == "fused"


def test_node_candidates_and_decision_in_state_keys() -> None:
    class State(TypedDict):
        messages: Annotated[list[Any], add_messages]
        candidates: list[Candidate]
        decision: Decision

    builder = StateGraph(State, context_schema=Ctx)
    builder.add_node(
        "agent",
        best_of_n(
            _runtime_node,
            n=3,
            selector=MajorityVote(),
            candidates_key="candidates",
            decision_key="decision",
        ),
    )
    builder.add_edge(START, "agent")
    out = builder.compile(checkpointer=InMemorySaver()).invoke(
        {"messages": [("user", "hi")]}, thread("k"), context=Ctx(user="ada")
    )
    assert [c.text for c in out["candidates"]] == ["hello ada"] * 3
    assert out["decision"].selected_index is not None
    with pytest.raises(ValueError, match="for a wrapped node"):
        fusion_of_n(FakeChatModel(), n=2, fusor=FakeChatModel(), candidates_key="c")
    with pytest.raises(ValueError, match="other than 'messages'"):
        fusion_of_n(_runtime_node, n=2, fusor=FakeChatModel(), decision_key="messages")


def test_a_node_returning_a_command_keeps_its_goto() -> None:
    def node(state: MessagesState) -> Command[Any]:
        return Command(update={"messages": [AIMessage("to the end")]}, goto="done")

    def done(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage("done")]}

    builder = StateGraph(MessagesState)
    builder.add_node(
        "agent",
        fusion_of_n(node, n=2, fusor=FakeChatModel(replies=["fused"])),
        destinations=("done",),
    )
    builder.add_node("done", done)
    builder.add_edge(START, "agent")
    builder.add_edge("done", END)
    out = builder.compile().invoke({"messages": [("user", "hi")]})
    assert [m.content for m in out["messages"][1:]] == ["fused", "done"]


# -- interrupt() and resume --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_interrupt_in_one_candidate_propagates_and_resumes(mode: str) -> None:
    made: list[int] = []

    def node(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        index = config["metadata"][INDEX_KEY]
        made.append(index)
        if index == 0:
            answer = interrupt("approve candidate 0?")
            return {"messages": [AIMessage(f"approved: {answer}")]}
        return {"messages": [AIMessage(f"plain {index}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", best_of_n(node, n=3, selector=lambda m, c: -c.index))
    builder.add_edge(START, "agent")
    graph = builder.compile(checkpointer=InMemorySaver())
    config = thread(f"i-{mode}")
    if mode == "sync":
        first = graph.invoke({"messages": [("user", "hi")]}, config)
    else:
        first = asyncio.run(graph.ainvoke({"messages": [("user", "hi")]}, config))
    assert first["__interrupt__"][0].value == "approve candidate 0?"  # not a failed candidate
    assert len(first["messages"]) == 1
    resume = Command(resume="yes")
    out = (
        graph.invoke(resume, config)
        if mode == "sync"
        else asyncio.run(graph.ainvoke(resume, config))
    )
    assert out["messages"][-1].content == "approved: yes"  # candidate 0 wins, resumed
    assert "__interrupt__" not in out
    assert made.count(0) == 2  # the node ran again from the start on resume


def test_every_candidate_interrupting_needs_one_resume_each() -> None:
    def node(state: MessagesState) -> dict[str, Any]:
        answer = interrupt("ok?")
        return {"messages": [AIMessage(f"got {answer}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", fusion_of_n(node, n=2, fusor=FakeChatModel(replies=["fused"])))
    builder.add_edge(START, "agent")
    graph = builder.compile(checkpointer=InMemorySaver())
    config = thread("all")
    out = graph.invoke({"messages": [("user", "hi")]}, config)
    assert "__interrupt__" in out
    out = graph.invoke(Command(resume="a"), config)
    assert "__interrupt__" in out  # the second candidate asks again
    out = graph.invoke(Command(resume="b"), config)
    assert out["messages"][-1].content == "fused"


def test_graph_interrupt_is_not_retried() -> None:
    from langgraph.types import RetryPolicy

    calls: list[int] = []

    def node(state: MessagesState) -> dict[str, Any]:
        calls.append(1)
        raise GraphInterrupt(())

    fused = fusion_of_n(node, n=1, fusor=FakeChatModel(), retry=RetryPolicy(max_attempts=3))
    with pytest.raises(GraphInterrupt):
        fused.invoke({"messages": [("user", "hi")]})
    assert calls == [1]
