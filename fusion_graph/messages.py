"""Conversations in and replies out: turning what callers pass into messages, and
checking what models return."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue


def message_text(message: BaseMessage) -> str:
    """The text content of a message (text blocks joined; other blocks ignored)."""
    return str(message.text)


def to_messages(value: Any) -> list[BaseMessage]:
    """The conversation in a model input (str, messages, prompt value); raises
    ``ValueError`` for an empty prompt."""
    if isinstance(value, PromptValue):
        messages = value.to_messages()
    elif isinstance(value, str):
        messages = [HumanMessage(value)]
    elif isinstance(value, BaseMessage):
        messages = [value]
    elif isinstance(value, Sequence):
        messages = convert_to_messages(value)
    else:
        msg = f"expected a string, messages or a prompt value, got {type(value).__name__}"
        raise TypeError(msg)
    if not any(
        message_text(m).strip() or (isinstance(m, AIMessage) and m.tool_calls) for m in messages
    ):
        msg = "the prompt is empty: give the model a question or some messages"
        raise ValueError(msg)
    return messages


def state_messages(state: Any) -> list[BaseMessage]:
    """``messages`` of a graph state (dict, pydantic model or dataclass)."""
    messages = (
        state.get("messages") if isinstance(state, Mapping) else getattr(state, "messages", None)
    )
    if messages is None:
        msg = "the state has no 'messages': wrapped nodes need a MessagesState-like state"
        raise ValueError(msg)
    return to_messages(list(messages))


def check_reply(message: AIMessage) -> AIMessage:
    """``message`` if it says something (text or tool calls); ``ValueError`` if empty."""
    if not message_text(message).strip() and not message.tool_calls:
        msg = "the model returned an empty reply (no text, no tool calls)"
        raise ValueError(msg)
    return message


def as_reply(value: Any, *, who: str) -> AIMessage:
    """A model's return value as a checked ``AIMessage`` (a string is wrapped)."""
    if isinstance(value, str):
        value = AIMessage(content=value)
    elif isinstance(value, BaseMessage) and not isinstance(value, AIMessage):
        value = AIMessage(content=value.content)
    if not isinstance(value, AIMessage):
        msg = f"{who} returned {type(value).__name__}, expected an AIMessage or a string"
        raise TypeError(msg)
    return check_reply(value)


class ChatContract:
    """Mix into a Runnable that keeps a chat model's contract (``messages | str ->
    AIMessage``), so LangChain and LangGraph see the right input and output types."""

    @property
    def InputType(self) -> Any:
        return LanguageModelInput

    @property
    def OutputType(self) -> type[AIMessage]:
        return AIMessage
