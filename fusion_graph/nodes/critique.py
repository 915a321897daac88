"""Critiques: a critic model reviews one candidate; the notes (and a 1-10 score, when the
critic gives one) go to the fusor or judges with the candidate."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig

from fusion_graph.hooks import CallInfo, current_hooks
from fusion_graph.messages import message_text
from fusion_graph.prompts import PromptTemplate, build_review_messages
from fusion_graph.runtime import Caller, CallResult, model_name, role_config
from fusion_graph.types import Candidate, Critique, ErrorInfo, TokenUsage

_SCORE = re.compile(r"score\W{0,3}(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.IGNORECASE)


def parse_critique_score(text: str) -> float | None:
    """The last ``Score: N/10`` in a critique, clamped to 1-10; ``None`` if absent."""
    found = _SCORE.findall(text)
    if not found:
        return None
    return min(10.0, max(1.0, float(found[-1])))


async def critique(
    critic: Runnable[Any, Any],
    prompt: PromptTemplate,
    conversation: Sequence[BaseMessage],
    candidate: Candidate,
    config: RunnableConfig,
    caller: Caller,
) -> Critique:
    """The critic's notes on ``candidate``; a failed critic call is recorded, not raised."""
    bare = candidate.model_copy(update={"critiques": []})  # not its own earlier critiques
    messages = build_review_messages(prompt, conversation, bare)
    child = role_config(
        config, role="critic", run_name=f"critique[{candidate.index}]", index=candidate.index
    )
    name = model_name(critic)
    with current_hooks().critique(CallInfo(index=candidate.index, model=name)) as done:
        result = await caller.call_model(critic, messages, child)
        notes = _to_critique(name, result)
        done(notes)
    return notes


def _to_critique(name: str, result: CallResult[Any]) -> Critique:
    if result.error is not None:
        return Critique(model=name, error=ErrorInfo.of(result.error), latency_s=result.latency_s)
    reply = result.value
    text = message_text(reply) if isinstance(reply, BaseMessage) else str(reply)
    return Critique(
        model=name,
        text=text,
        score=parse_critique_score(text),
        usage=TokenUsage.of(reply),
        latency_s=result.latency_s,
    )
