"""Messages to chat-template dicts, shared by the in-process engines."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage

from fusion_graph.integrations.chat_template import to_chat


def test_roles_and_text() -> None:
    messages = [
        SystemMessage("be brief"),
        HumanMessage([{"type": "text", "text": "hi"}]),
        AIMessage("hello"),
        ChatMessage(role="critic", content="meh"),
    ]
    assert to_chat(messages, reader="X") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "critic", "content": "meh"},
    ]


def test_non_text_parts_are_refused_with_a_sentence() -> None:
    image = HumanMessage([{"type": "image_url", "image_url": {"url": "data:,"}}])
    with pytest.raises(ValueError, match="Message 0 has a 'image_url' part, but X reads text"):
        to_chat([image], reader="X")
