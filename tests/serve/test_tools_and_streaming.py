"""Tool calls through the proxy (JSON and streamed, fused and selected, and the tool
answer sent back), and real streaming: the client has the fusor's first token before the
fusor makes its last one. The upstream is a fake chat model (``fusion_graph.testing``)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, ToolMessage
from langchain_core.outputs import ChatGenerationChunk
from pydantic import Field

from fusion_graph.testing import CallRecorder, FakeCall, FakeChatModel, tool_call
from tests.serve.conftest import Serve

pytestmark = pytest.mark.server

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is 2 + 3? Use add."}]


def tool_reply(call: FakeCall) -> AIMessage | str:
    if isinstance(call.messages[-1], ToolMessage):
        return f"The sum is {call.messages[-1].content}."
    if "<candidate" in call.prompt and "The sum is 5." in call.prompt:
        return "The sum is 5."
    if not call.kwargs.get("tools"):
        return "no tools were bound"
    # The fusor is told by its prompt (the fake's streamed calls do not see their role).
    fusor = call.role == "fusor" or "<candidate" in call.prompt
    who = "fused" if fusor else "direct" if call.role is None else f"c{call.index}"
    return AIMessage(content="", tool_calls=[tool_call("add", {"a": 2, "b": 3}, id=f"call_{who}")])


@pytest.fixture
def recorder() -> CallRecorder:
    return CallRecorder()


@pytest.fixture
def tool_model(recorder: CallRecorder) -> FakeChatModel:
    return FakeChatModel(replies=tool_reply, recorder=recorder, model_name="fake-tools")


@pytest.mark.parametrize(
    ("model", "call_id"),
    [
        ("fusion-3/fake-tools", "call_fused"),
        ("vote-3/fake-tools", None),
        ("fake-tools", "call_direct"),
    ],
)
def test_tool_calls_come_back_in_openai_format(
    serve: Serve, tool_model: FakeChatModel, recorder: CallRecorder, model: str, call_id: str | None
) -> None:
    proxy = serve(tool_model)
    reply = proxy.client().chat.completions.create(model=model, messages=QUESTION, tools=[ADD])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add"
    assert json.loads(call.function.arguments) == {"a": 2, "b": 3}
    if call_id is not None:
        assert call.id == call_id
    else:  # BoN returns one candidate's call unchanged
        assert call.id in {"call_c0", "call_c1", "call_c2"}
    assert all("add" in str(c.kwargs["tools"]) for c in recorder.calls)  # every call had the tool


def test_tool_calls_stream_as_deltas(serve: Serve, tool_model: FakeChatModel) -> None:
    proxy = serve(tool_model)
    stream = proxy.client().chat.completions.create(
        model="fusion-2/fake-tools", messages=QUESTION, tools=[ADD], stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or []:
                entry = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += piece.id or ""
                if piece.function is not None:
                    entry["name"] += piece.function.name or ""
                    entry["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls.values()) == [
        {"id": "call_fused", "name": "add", "arguments": json.dumps({"a": 2, "b": 3})}
    ]


def test_the_tool_answer_goes_back_to_every_candidate(
    serve: Serve, tool_model: FakeChatModel, recorder: CallRecorder
) -> None:
    proxy = serve(tool_model)
    messages: list[dict[str, Any]] = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_fused",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_fused", "content": "5"},
    ]
    reply = proxy.client().chat.completions.create(
        model="fusion-2/fake-tools", messages=messages, tools=[ADD]
    )
    assert reply.choices[0].finish_reason == "stop"
    generators = recorder.by_role("generator")
    assert len(generators) == 2
    for call in generators:
        assistant, tool = call.messages[-2:]
        assert isinstance(assistant, AIMessage) and assistant.tool_calls[0]["args"] == {
            "a": 2,
            "b": 3,
        }
        assert isinstance(tool, ToolMessage) and tool.tool_call_id == "call_fused"


class GatedModel(FakeChatModel):
    """Streams "first", then waits for the test to open the gate before " last": a proxy
    that held the answer back until it was whole would make it wait in vain (it gives up
    after 10 s, and says so in the answer)."""

    gate: threading.Event = Field(default_factory=threading.Event)
    opened: list[bool] = Field(default_factory=list)

    async def _astream(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        yield ChatGenerationChunk(message=AIMessageChunk(content="first"))
        opened = await asyncio.to_thread(self.gate.wait, 10)
        self.opened.append(opened)
        yield ChatGenerationChunk(message=AIMessageChunk(content=" last" if opened else " late"))


@pytest.mark.parametrize("model", ["fusion-3/gated", "gated"])
def test_the_first_token_arrives_before_the_last_is_made(serve: Serve, model: str) -> None:
    gated = GatedModel(replies=["a candidate"], model_name="gated")
    proxy = serve(gated)
    stream = proxy.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Go."}], stream=True
    )
    text = ""
    for chunk in stream:
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content == "first":
            assert not gated.gate.is_set()
            gated.gate.set()  # only now may the model make its last token
        text += content or ""
    assert text == "first last"
    assert gated.opened == [True]


async def test_async_streaming_is_incremental_too(serve: Serve) -> None:
    gated = GatedModel(replies=["a candidate"], model_name="gated")
    proxy = serve(gated)
    async with proxy.async_client() as client:
        stream = await client.chat.completions.create(
            model="fusion-2/gated", messages=[{"role": "user", "content": "Go."}], stream=True
        )
        pieces = []
        async for chunk in stream:
            content = chunk.choices[0].delta.content if chunk.choices else None
            if content == "first":
                gated.gate.set()
            pieces.append(content or "")
    assert "".join(pieces) == "first last"
    assert gated.opened == [True]
