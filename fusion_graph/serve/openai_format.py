"""OpenAI's chat-completions shapes: the request body (pydantic models) and how it becomes
LangChain messages and call options, and the response, chunk and usage bodies built from
LangChain messages.

Only what the proxy acts on is modelled; other request fields are accepted and ignored
(``extra="allow"``), as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_messages
from pydantic import BaseModel, ConfigDict, Field

from fusion_graph.serve.strategy import StrategyOverrides
from fusion_graph.types import TokenUsage


class ChatMessage(BaseModel):
    """One message of the conversation, in OpenAI's format."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant's calls: ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
    tool_call_id: str | None = None
    """A tool message's answer to this call."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class FusionGraphOptions(BaseModel):
    """The request's ``fusion_graph`` object (``extra_body={"fusion_graph": {...}}``)."""

    model_config = ConfigDict(extra="forbid")

    strategy: str | None = None
    """``"fusion"``, ``"best_of_n"`` or ``"none"`` (pass through)."""
    n: int | None = None
    """Candidates."""
    selector: str | None = None
    """How Best-of-N picks: ``judge``, ``pairwise`` or ``vote``."""
    critic: bool | None = None
    """Critique each candidate before the decision."""

    def overrides(self) -> StrategyOverrides:
        return StrategyOverrides(
            strategy=self.strategy, n=self.n, selector=self.selector, critic=self.critic
        )


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    """OpenAI's choices per request: only 1 (ask for candidates with a strategy)."""
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    fusion_graph: FusionGraphOptions | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[BaseMessage]:
        """The messages as LangChain messages (tool calls and tool answers included)."""
        dicts = []
        for message in self.messages:
            data = message.model_dump(exclude_none=True)
            data["content"] = message.content or ""
            dicts.append(data)
        return convert_to_messages(dicts)

    def call_options(self) -> dict[str, Any]:
        """The sampling options to bind on every upstream call (``seed`` for a fan-out is
        the base seed: candidate ``i`` gets ``seed + i``)."""
        options: dict[str, Any] = {}
        if self.requested_max_tokens is not None:
            options["max_tokens"] = self.requested_max_tokens
        for key in ("temperature", "top_p", "seed"):
            value = getattr(self, key)
            if value is not None:
                options[key] = value
        if self.stop is not None:
            options["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        return options


# -- responses ----------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(usage: TokenUsage | None) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    total = usage or TokenUsage()
    return {
        "prompt_tokens": total.input_tokens,
        "completion_tokens": total.output_tokens,
        "total_tokens": total.total_tokens,
    }


def tool_calls_body(message: AIMessage) -> list[dict[str, Any]]:
    """A message's tool calls in OpenAI's format."""
    return [
        {
            "id": call.get("id") or f"call_{i}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["args"])},
        }
        for i, call in enumerate(message.tool_calls)
    ]


def finish_reason(message: AIMessage | AIMessageChunk) -> str:
    """``tool_calls`` when the answer calls tools, ``length`` when the model said it ran out
    of tokens, else ``stop``."""
    if message.tool_calls or getattr(message, "tool_call_chunks", None):
        return "tool_calls"
    reason = message.response_metadata.get("finish_reason")
    return "length" if reason == "length" else "stop"


def completion_body(
    message: AIMessage,
    *,
    id: str,
    model: str,
    usage: TokenUsage | None,
    extension: Mapping[str, Any],
) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice, and the ``fusion_graph`` extension."""
    reply: dict[str, Any] = {"role": "assistant", "content": str(message.text)}
    if message.tool_calls:
        reply["tool_calls"] = tool_calls_body(message)
        reply["content"] = reply["content"] or None
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": reply,
                "finish_reason": finish_reason(message),
                "logprobs": None,
            }
        ],
        "usage": usage_body(usage),
        "fusion_graph": dict(extension),
    }


def chunk_body(
    *,
    id: str,
    model: str,
    delta: Mapping[str, Any] | None = None,
    finish: str | None = None,
    usage: TokenUsage | None = None,
    extension: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``: a delta (or the finish reason) of choice 0, or, with
    ``usage`` and no delta, the usage chunk (``choices: []``)."""
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
    }
    if delta is not None or finish is not None:
        body["choices"] = [
            {"index": 0, "delta": dict(delta or {}), "finish_reason": finish, "logprobs": None}
        ]
    if usage is not None:
        body["usage"] = usage_body(usage)
    if extension is not None:
        body["fusion_graph"] = dict(extension)
    return body


def chunk_delta(chunk: AIMessageChunk) -> dict[str, Any] | None:
    """A LangChain chunk as an OpenAI delta (content and tool-call pieces); ``None`` when
    it carries neither (e.g. a usage-only chunk)."""
    delta: dict[str, Any] = {}
    text = str(chunk.text)
    if text:
        delta["content"] = text
    calls = []
    for piece in chunk.tool_call_chunks:
        call: dict[str, Any] = {"index": piece.get("index") or 0}
        if piece.get("id"):
            call["id"] = piece["id"]
            call["type"] = "function"
        function = {}
        if piece.get("name"):
            function["name"] = piece["name"]
        if piece.get("args"):
            function["arguments"] = piece["args"]
        if function:
            call["function"] = function
        calls.append(call)
    if calls:
        delta["tool_calls"] = calls
    return delta or None


def message_deltas(message: AIMessage) -> Sequence[dict[str, Any]]:
    """A whole message as deltas: its text, then one delta per tool call."""
    deltas: list[dict[str, Any]] = []
    if message.text:
        deltas.append({"content": str(message.text)})
    for i, call in enumerate(tool_calls_body(message)):
        deltas.append({"tool_calls": [{"index": i, **call}]})
    return deltas


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
