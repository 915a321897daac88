"""Fan-in by fusion (FusioN): a fusor model reads the conversation and every successful
candidate (with its critiques) and writes one answer."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    message_chunk_to_message,
)
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import patch_config

from fusion_graph.nodes.calls import Caller, CallResult
from fusion_graph.nodes.generate import ROLE_KEY, _check_reply
from fusion_graph.prompts import PromptTemplate, build_fusion_messages
from fusion_graph.state import Candidate


def fusor_config(config: RunnableConfig) -> RunnableConfig:
    """The fusor's config: unlike candidates, it streams in LangGraph's ``messages`` mode."""
    child = patch_config(config, run_name="fusor")
    child["metadata"] = {**child.get("metadata", {}), ROLE_KEY: "fusor"}
    return child


async def call_fusor(
    fusor: Runnable[Any, Any],
    template: PromptTemplate,
    conversation: Sequence[BaseMessage],
    candidates: Sequence[Candidate],
    config: RunnableConfig,
    caller: Caller,
) -> tuple[AIMessage | None, CallResult[Any]]:
    """Ask the fusor for the fused answer; ``(None, result)`` when it failed or its reply
    was empty (the result then carries the error)."""
    messages = build_fusion_messages(template, conversation, candidates)
    child = fusor_config(config)

    def check(reply: Any) -> AIMessage:
        message = AIMessage(content=reply) if isinstance(reply, str) else reply
        if not isinstance(message, AIMessage):
            msg = f"the fusor returned {type(reply).__name__}, expected an AIMessage"
            raise TypeError(msg)
        return _check_reply(strip_fences(message))

    sink = token_sink.get()
    if sink is None:
        result = await caller.call(
            lambda: check(fusor.invoke(messages, child)),
            _acheck(fusor, messages, child, check),
        )
    else:

        def stream() -> AIMessage:
            return check(_joined(sink(c) for c in fusor.stream(messages, child)))

        async def astream() -> AIMessage:
            return check(_joined([sink(c) async for c in fusor.astream(messages, child)]))

        result = await caller.call(stream, astream)
    return (result.value if result.error is None else None), result


token_sink: ContextVar[Callable[[Any], Any] | None] = ContextVar(
    "fusion_graph_token_sink", default=None
)
"""Set by ``FusionRunnable.stream``: receives the fusor's chunks as they are generated
(and must return each chunk it gets)."""


def _joined(chunks: Iterable[Any]) -> AIMessage:
    total: AIMessageChunk | None = None
    for chunk in chunks:
        piece = chunk if isinstance(chunk, AIMessageChunk) else AIMessageChunk(content=str(chunk))
        total = piece if total is None else total + piece
    if total is None:
        return AIMessage(content="")
    return message_chunk_to_message(total)  # type: ignore[return-value]


_FENCE_LINE = re.compile(r"^\s*</?candidate\b[^>]*>\s*$", re.MULTILINE)


def strip_fences(message: AIMessage) -> AIMessage:
    """Drop candidate fence tags that a weak fusor echoes on lines of their own."""
    if not isinstance(message.content, str) or "candidate" not in message.content:
        return message
    cleaned = _FENCE_LINE.sub("", message.content).strip()
    return message.model_copy(update={"content": cleaned})


def _acheck(
    fusor: Runnable[Any, Any], messages: list[BaseMessage], config: RunnableConfig, check: Any
) -> Any:
    async def call() -> AIMessage:
        return check(await fusor.ainvoke(messages, config))  # type: ignore[no-any-return]

    return call
