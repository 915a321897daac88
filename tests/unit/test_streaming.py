"""Streaming: progress events in LangGraph's ``custom`` mode, the fusor's tokens in
``messages`` mode (and nothing from candidates or judges), and ``stream``/``astream`` of
the wrapped Runnable."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.messages import AIMessageChunk

from fusion_graph import (
    MajorityVote,
    NotEnoughCandidatesError,
    best_of_n,
    create_fusion_graph,
    fusion_of_n,
)
from fusion_graph.testing import FakeChatModel
from tests.conftest import Mode

FUSED = "Paris is the capital of France"


def _stream(mode: Mode, runnable: Any, value: Any, **kwargs: Any) -> list[Any]:
    if mode.sync:
        return list(runnable.stream(value, **kwargs))

    async def collect() -> list[Any]:
        return [chunk async for chunk in runnable.astream(value, **kwargs)]

    return asyncio.run(collect())


def test_wrapped_runnable_streams_the_fusor_tokens(mode: Mode) -> None:
    gen = FakeChatModel(replies=["Paris", "Lyon", "Paris!"], delay=0.02)
    fused = fusion_of_n(gen, n=3, fusor=FakeChatModel(replies=[FUSED]))
    chunks = _stream(mode, fused, "Capital of France?")
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    words = [c for c in chunks if c.content]
    assert len(words) == len(FUSED.split())  # token by token, not one blob
    assert "".join(str(c.content) for c in chunks) == FUSED


def test_best_of_n_streams_the_chosen_answer(mode: Mode) -> None:
    best = best_of_n(FakeChatModel(replies=["7", "8", "7"]), n=3, selector=MajorityVote())
    chunks = _stream(mode, best, "q")
    assert [c.content for c in chunks] == ["7"]


def test_stream_raises_the_run_error(mode: Mode) -> None:
    fused = fusion_of_n(FakeChatModel(replies=[RuntimeError("down")]), n=2, fusor=FakeChatModel())
    with pytest.raises(NotEnoughCandidatesError, match="0 of 2 candidates succeeded"):
        _stream(mode, fused, "q")


def test_graph_streams_progress_then_fusor_tokens(mode: Mode) -> None:
    graph = create_fusion_graph(
        FakeChatModel(replies=["alpha one", "beta two", "gamma three"], delay=0.02),
        n=3,
        strategy="fusion",
        fusor=FakeChatModel(replies=[FUSED]),
        critic=FakeChatModel(replies=["Fine. Score: 7/10"]),
    ).compile()
    modes = ["custom", "messages", "updates"]
    value = {"messages": [("user", "Capital of France?")]}
    if mode.sync:
        parts = list(graph.stream(value, stream_mode=modes))
    else:

        async def collect() -> list[Any]:
            return [p async for p in graph.astream(value, stream_mode=modes)]

        parts = asyncio.run(collect())

    custom = [data for kind, data in parts if kind == "custom"]
    kinds = [e["event"] for e in custom]
    assert kinds.count("candidate_started") == 3 and kinds.count("candidate_finished") == 3
    assert kinds[-2:] == ["decision_started", "decision"]
    finished = [e for e in custom if e["event"] == "candidate_finished"]
    assert sorted(e["index"] for e in finished) == [0, 1, 2]
    assert all(e["ok"] and e["output_tokens"] == 2 and e["critique_score"] == 7 for e in finished)
    assert custom[-1]["fused"] is True

    tokens = [data[0].content for kind, data in parts if kind == "messages" and data[0].content]
    # Only the fusor streams: no candidate, critic or judge tokens.
    assert "".join(tokens) == FUSED
    assert len(tokens) == len(FUSED.split())
    first_token = next(i for i, (kind, _) in enumerate(parts) if kind == "messages")
    last_candidate = max(
        i
        for i, (kind, data) in enumerate(parts)
        if kind == "custom" and data["event"] == "candidate_finished"
    )
    assert last_candidate < first_token
    updates = [data for kind, data in parts if kind == "updates"]
    assert [next(iter(u)) for u in updates] == ["generate", "fuse"]
