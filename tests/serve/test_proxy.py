"""The proxy in front of the fake OpenAI-compatible upstream, through the real ``openai``
client (sync and async, JSON and streamed) and LangChain's ``ChatOpenAI``: pass-through is
one upstream call; fusion makes its N candidates (``n`` honoured or not) and one fusor call;
``usage`` is what the upstream reported for all of them."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from langchain_openai import ChatOpenAI

from fusion_graph import MajorityVote
from tests.faults.fake_openai import COMPLETION_TOKENS, PROMPT_TOKENS, FakeOpenAI
from tests.serve.conftest import FAKE_MODEL, RunningProxy

pytestmark = pytest.mark.server

QUESTION = [{"role": "user", "content": "What is six times seven?"}]


def billed(fake: FakeOpenAI) -> dict[str, int]:
    """What the fake upstream reported in ``usage`` over every request it answered."""
    choices = [r.n if fake.honour_n else 1 for r in fake.requests]
    prompt = PROMPT_TOKENS * len(choices)
    completion = COMPLETION_TOKENS * sum(choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def usage_of(response: Any) -> dict[str, int]:
    u = response.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def test_a_plain_model_name_is_one_upstream_call(
    proxy: RunningProxy, fake_openai: FakeOpenAI
) -> None:
    reply = proxy.client().chat.completions.create(model=FAKE_MODEL, messages=QUESTION)
    assert fake_openai.received == 1
    (request,) = fake_openai.requests
    assert request.n == 1 and request.prompt == "What is six times seven?"
    assert reply.model == FAKE_MODEL
    assert reply.choices[0].message.content == "The fused answer is 42."
    assert usage_of(reply) == billed(fake_openai)
    assert reply.id == "chatcmpl-0"  # the upstream's own answer, passed on raw
    assert "fusion_graph" not in reply.model_extra


def test_request_options_reach_the_upstream(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    proxy.client().chat.completions.create(
        model=FAKE_MODEL, messages=QUESTION, max_tokens=17, temperature=0.25, stop=["\n\n"]
    )
    body = fake_openai.requests[0].body
    assert (body["max_tokens"], body["temperature"], body["stop"]) == (17, 0.25, ["\n\n"])


@pytest.mark.parametrize("honour_n", [True, False])
def test_fusion_makes_n_distinct_candidates_and_one_fusor_call(
    proxy: RunningProxy, fake_openai: FakeOpenAI, honour_n: bool
) -> None:
    fake_openai.configure(honour_n=honour_n)
    reply = proxy.client().chat.completions.create(model="fusion-4/fake", messages=QUESTION)
    candidate_requests = [r for r in fake_openai.requests if r.seed is not None]
    fusor_requests = [r for r in fake_openai.requests if r.seed is None]
    if honour_n:  # one request for the four candidates
        assert [r.n for r in candidate_requests] == [4]
    else:  # the ignored n is noticed: the missing three come from requests of their own
        assert candidate_requests[0].n == 4
        assert len({r.seed for r in candidate_requests[1:]}) == 3
    assert len(fusor_requests) == 1
    report = reply.model_extra["fusion_graph"]
    texts = {c["index"] for c in report["candidates"] if c["status"] == "ok"}
    assert texts == {0, 1, 2, 3}
    fusor_prompt = fusor_requests[0].prompt
    distinct = {line for line in fusor_prompt.splitlines() if line.startswith("Candidate for seed")}
    assert len(distinct) == 4, "the fusor must see four different candidates, not copies"
    assert reply.model == "fusion-4/fake"
    assert reply.choices[0].message.content == "The fused answer is 42."
    assert usage_of(reply) == billed(fake_openai)


def test_usage_is_the_sum_of_its_stages(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    reply = proxy.client().chat.completions.create(model="fusion-3-critic/fake", messages=QUESTION)
    report = reply.model_extra["fusion_graph"]
    stages = report["usage_by_stage"]
    assert stages["critiques"]["total_tokens"] > 0  # the critic ran, and was counted
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert getattr(reply.usage, key) == sum(s[key] for s in stages.values())
    assert usage_of(reply) == billed(fake_openai)
    assert reply.model == "fusion-3-critic/fake"
    assert [c["status"] for c in report["candidates"]] == ["ok", "ok", "ok"]
    assert all(c["latency_s"] > 0 for c in report["candidates"])


def test_extra_body_chooses_the_strategy(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    reply = proxy.client().chat.completions.create(
        model=FAKE_MODEL,
        messages=QUESTION,
        extra_body={"fusion_graph": {"strategy": "best_of_n", "n": 3, "selector": "vote"}},
    )
    assert reply.model == "bon-3-vote/fake"
    report = reply.model_extra["fusion_graph"]
    assert report["decision"]["method"] == MajorityVote().name
    assert report["decision"]["selected_index"] in {0, 1, 2}
    assert reply.choices[0].message.content.startswith("Candidate for seed")  # chosen, unchanged
    assert fake_openai.received == 1  # three candidates in one n=3 request, no judge call


@pytest.mark.parametrize(
    ("model", "ran"),
    [("fake", "fake"), ("fusion-4/fake", "fusion-4/fake"), ("vote-3/fake", "bon-3-vote/fake")],
)
def test_streams_end_with_usage_and_the_same_answer(
    proxy: RunningProxy, fake_openai: FakeOpenAI, model: str, ran: str
) -> None:
    stream = proxy.client().chat.completions.create(
        model=model, messages=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"]
    assert "42" in text
    assert chunks[-1].choices == []
    assert usage_of(chunks[-1]) == billed(fake_openai)
    assert {c.model for c in chunks} == {ran}


async def test_the_async_client_streams_and_completes(
    proxy: RunningProxy, fake_openai: FakeOpenAI
) -> None:
    async with proxy.async_client() as client:
        whole, stream = await asyncio.gather(
            client.chat.completions.create(model="fusion-2/fake", messages=QUESTION),
            client.chat.completions.create(model="fusion-2/fake", messages=QUESTION, stream=True),
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content == "The fused answer is 42."


def test_sse_comments_report_each_finished_candidate(proxy: RunningProxy) -> None:
    body = {"model": "fusion-3/fake", "messages": QUESTION, "stream": True}
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    assert sorted(c.split(" finished")[0] for c in comments if "finished" in c) == [
        ": candidate 0",
        ": candidate 1",
        ": candidate 2",
    ]
    assert lines[-1] == "data: [DONE]"
    first_content = next(i for i, line in enumerate(lines) if '"content"' in line)
    assert all(lines.index(c) < first_content for c in comments)


def test_langchain_chat_openai_invokes_and_streams(
    proxy: RunningProxy, fake_openai: FakeOpenAI
) -> None:
    llm = ChatOpenAI(
        base_url=proxy.base_url, api_key="unused", model="fusion-2/fake", max_retries=0
    )
    message = llm.invoke("What is six times seven?")
    assert message.content == "The fused answer is 42."
    assert message.response_metadata["model_name"] == "fusion-2/fake"
    assert message.usage_metadata is not None and message.usage_metadata["total_tokens"] > 0
    streamed = "".join(str(c.content) for c in llm.stream("What is six times seven?"))
    assert streamed == "The fused answer is 42."
    bon = llm.bind(extra_body={"fusion_graph": {"strategy": "best_of_n", "selector": "vote"}})
    assert "Candidate for seed" in str(bon.invoke("What is six times seven?").content)


def test_models_and_health(proxy: RunningProxy) -> None:
    ids = [m.id for m in proxy.client().models.list()]
    assert ids[0] == FAKE_MODEL and "fusion-4/fake" in ids
    health = httpx.get(f"{proxy.url}/health").json()
    assert health == {"status": "ok", "upstream": FAKE_MODEL, "in_flight": 0, "waiting": 0}
