"""LangChain messages as the ``{"role", "content"}`` dicts that chat templates read (used by
the in-process engines: llama.cpp and vLLM)."""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import BaseMessage, ChatMessage

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


def to_chat(messages: Sequence[BaseMessage], *, reader: str) -> list[dict[str, str]]:
    """Role/content dicts for a chat template; ``reader`` names the model in errors.

    Raises:
        ValueError: a message type without a chat role, or a non-text content part.
    """
    chat: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if isinstance(message, ChatMessage):
            role = message.role
        elif message.type in _ROLES:
            role = _ROLES[message.type]
        else:
            msg = (
                f"Message {i} has type {message.type!r}, which {reader} cannot read; "
                "send system, human, ai, tool or ChatMessage messages."
            )
            raise ValueError(msg)
        if isinstance(message.content, list):
            for part in message.content:
                if isinstance(part, dict) and part.get("type", "text") != "text":
                    msg = (
                        f"Message {i} has a {part.get('type')!r} part, but {reader} "
                        "reads text only; send text content."
                    )
                    raise ValueError(msg)
        chat.append({"role": role, "content": message.text})
    return chat
