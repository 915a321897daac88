"""Fan-in by fusion (FusioN): a fusor model reads the conversation and every successful
candidate (with its critiques) and writes one answer."""

from __future__ import annotations

import re
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, message_chunk_to_message
from langchain_core.runnables import Runnable

from fusion_graph.messages import as_reply
from fusion_graph.nodes.decide import (
    Decider,
    SelectionContext,
    Selector,
    TokenSink,
    checked_fallback,
)
from fusion_graph.nodes.select import DEFAULT_FALLBACK
from fusion_graph.prompts import FUSION_PROMPT, PromptTemplate, build_fusion_messages
from fusion_graph.runtime import model_name, role_config
from fusion_graph.types import Decision, TokenUsage


class Fuse(Decider):
    """FusioN: the fusor writes one answer from all candidates.

    Args:
        fusor: The chat model that writes the final answer. Bind it to the same tools as
            the generators (``llm.bind_tools(tools)``) to let it answer with tool calls.
        prompt: The fusion prompt template.
        fallback: Selector used if the fusor fails (default :class:`MajorityVote`);
            ``None`` raises :class:`~fusion_graph.DecisionError` instead.

    Example:
        >>> from fusion_graph import Fuse
        >>> fuse = Fuse(llm)  # doctest: +SKIP
        >>> message, decision = fuse.decide("Capital?", ["Paris", "Lyon"])  # doctest: +SKIP
    """

    strategy = "fusion"

    def __init__(
        self,
        fusor: Runnable[Any, Any],
        *,
        prompt: PromptTemplate = FUSION_PROMPT,
        fallback: Selector | None = DEFAULT_FALLBACK,
    ) -> None:
        if not isinstance(fusor, Runnable):
            msg = f"fusor must be a chat model or Runnable, got {type(fusor).__name__}"
            raise TypeError(msg)
        if not isinstance(prompt, PromptTemplate):
            msg = f"prompt must be a PromptTemplate, got {type(prompt).__name__}"
            raise TypeError(msg)
        prompt.check("fusion")
        self.fusor = fusor
        self.prompt = prompt
        self.fallback = checked_fallback(fallback)

    @property
    def method(self) -> str:
        return f"fusion:{model_name(self.fusor)}"

    async def attempt(
        self, context: SelectionContext, *, on_token: TokenSink | None = None
    ) -> tuple[AIMessage, Decision]:
        messages = build_fusion_messages(self.prompt, context.conversation, context.candidates)
        config = role_config(context.config, role="fusor", run_name="fusor", stream=True)
        fusor = self.fusor

        def check(reply: Any) -> AIMessage:
            return as_reply(strip_fences(as_reply(reply, who="the fusor")), who="the fusor")

        if on_token is None:

            def invoke() -> AIMessage:
                return check(fusor.invoke(messages, config))

            async def ainvoke() -> AIMessage:
                return check(await fusor.ainvoke(messages, config))

            message: AIMessage = await context.call_either(invoke, ainvoke)
        else:

            def stream() -> AIMessage:
                return check(_joined([_sent(on_token, c) for c in fusor.stream(messages, config)]))

            async def astream() -> AIMessage:
                chunks = [_sent(on_token, c) async for c in fusor.astream(messages, config)]
                return check(_joined(chunks))

            message = await context.call_either(stream, astream)
        decision = Decision(
            strategy="fusion", fused=True, method=self.method, usage=TokenUsage.of(message)
        )
        return message, decision


def _sent(on_token: TokenSink, chunk: Any) -> Any:
    on_token(chunk if isinstance(chunk, AIMessageChunk) else AIMessageChunk(content=str(chunk)))
    return chunk


def _joined(chunks: list[Any]) -> AIMessage:
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
