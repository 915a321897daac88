"""FusioN and BoN against llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``),
a backend that ignores ``n`` (it always answers with one choice)."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage

from fusion_graph import LLMJudge, best_of_n, fusion_of_n
from fusion_graph.integrations.openai_compat import ChatOpenAICompatible, openai_compatible
from tests.conftest import Mode
from tests.server.conftest import SERVED_NAME, Endpoint

pytestmark = pytest.mark.server

MAX_TOKENS = 24


def model(endpoint: Endpoint, **kwargs: object) -> ChatOpenAICompatible:
    options: dict[str, object] = {"max_tokens": MAX_TOKENS, "temperature": 0.9, **kwargs}
    return openai_compatible(endpoint.base_url, SERVED_NAME, **options)  # type: ignore[arg-type]


def test_backend_ignoring_n_still_yields_n_candidates(llama: Endpoint) -> None:
    llm = model(llama)
    replies = llm.sample_n("Name a fruit.", seeds=[10, 11, 12, 13])

    assert len(replies) == 4
    assert all(isinstance(r, AIMessage) and r.content for r in replies), replies
    posts = llama.proxy.chat_requests()
    assert posts[0].body is not None and posts[0].body["n"] == 4
    assert posts[0].response is not None and len(posts[0].response["choices"]) == 1
    # The three missing candidates: extra requests, each with its own seed.
    assert [p.body.get("n") if p.body else "?" for p in posts[1:]] == [None, None, None]
    assert posts[0].body["seed"] == 10
    assert sorted(p.body["seed"] for p in posts[1:] if p.body) == [11, 12, 13]
    by_seed = {p.body["seed"]: p for p in posts if p.body}
    assert [r.response_metadata["request_n"] for r in replies if isinstance(r, AIMessage)] == [
        4,
        1,
        1,
        1,
    ]
    # Usage is not split: each reply reports its own request's.
    for reply, seed in zip(replies, [10, 11, 12, 13], strict=True):
        assert isinstance(reply, AIMessage) and reply.usage_metadata is not None
        assert reply.response_metadata["seed"] == seed
        response = by_seed[seed].response
        assert response is not None
        assert reply.usage_metadata["output_tokens"] == response["usage"]["completion_tokens"]

    # Remembered: the next fan-out goes straight to separate requests.
    llama.proxy.reset()
    again = llm.sample_n("Name a fruit.", seeds=[20, 21, 22])
    assert len(again) == 3 and all(isinstance(r, AIMessage) for r in again)
    assert [p.body.get("n") if p.body else "?" for p in llama.proxy.chat_requests()] == [None] * 3


def test_fusion_end_to_end(llama: Endpoint, mode: Mode) -> None:
    llm = model(llama)
    result = mode.run(fusion_of_n(llm, n=3, fusor=llm), "Name a primary colour.")

    assert [c.ok for c in result.candidates] == [True] * 3
    assert result.decision.fused and result.message.content
    posts = llama.proxy.chat_requests()
    # n=3 answered with one choice, two extra candidate requests, then the fusor.
    assert [p.body.get("n") if p.body else "?" for p in posts] == [3, None, None, None]
    assert len({c.text for c in result.candidates}) >= 2


def test_best_of_n_end_to_end(llama: Endpoint, mode: Mode) -> None:
    llm = model(llama, supports_n=False)
    judge = model(llama, temperature=0.0, max_tokens=16)
    # llama-cpp-python's server answers 500 to an OpenAI `json_schema` response_format (it
    # takes only `json_object`), so its verdicts are parsed from text.
    selector = LLMJudge(judge, constrained=False)
    result = mode.run(best_of_n(llm, n=3, selector=selector), "What is 2 + 2?")

    assert [c.ok for c in result.candidates] == [True] * 3
    assert result.decision.selected_index in range(3)
    posts = llama.proxy.chat_requests()
    assert len(posts) == 3 + 3  # three candidates, then three judge calls
    assert all(p.body is not None and "n" not in p.body for p in posts)
