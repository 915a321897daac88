"""FusioN and BoN against a real vLLM OpenAI-compatible server (CPU, converted SmolLM2).

Model traffic goes through the counting proxy (requests are counted at the server's door);
prefill work is read from vLLM's own ``/metrics``.
"""

from __future__ import annotations

import uuid

import pytest
from langchain_core.messages import AIMessage

from fusion_graph import LLMJudge, best_of_n, fusion_of_n
from fusion_graph.integrations.openai_compat import ChatOpenAICompatible, openai_compatible
from fusion_graph.testing import FakeChatModel
from tests.conftest import Mode
from tests.server.conftest import SERVED_NAME, Endpoint, metric

pytestmark = pytest.mark.server

N = 4
MAX_TOKENS = 32


def model(endpoint: Endpoint, **kwargs: object) -> ChatOpenAICompatible:
    options: dict[str, object] = {"max_tokens": MAX_TOKENS, "temperature": 0.9, **kwargs}
    return openai_compatible(endpoint.base_url, SERVED_NAME, **options)  # type: ignore[arg-type]


def test_fusion_makes_n_candidates_in_one_http_request(vllm: Endpoint, mode: Mode) -> None:
    llm = model(vllm)
    result = mode.run(fusion_of_n(llm, n=N, fusor=llm), "Name a primary colour.")

    posts = vllm.proxy.chat_requests()
    # The N candidates: one request with n=N. Then the fusor's own request.
    assert [p.body.get("n") if p.body else None for p in posts] == [N, None]
    assert [p.status for p in posts] == [200, 200]
    assert [c.ok for c in result.candidates] == [True] * N
    assert result.decision.fused
    assert isinstance(result.message, AIMessage) and result.message.content
    # One seed per request: the first candidate's.
    assert posts[0].body is not None and posts[0].body.get("seed") == result.candidates[0].seed
    # Each candidate is its own Candidate with its share of the one response's usage.
    response = posts[0].response
    assert response is not None and len(response["choices"]) == N
    usage = [c.usage for c in result.candidates]
    assert all(u is not None for u in usage)
    assert sum(u.input_tokens for u in usage if u) == response["usage"]["prompt_tokens"]
    assert sum(u.output_tokens for u in usage if u) == response["usage"]["completion_tokens"]
    assert len({c.text for c in result.candidates}) >= 2, "n samples should differ"


def block_size(vllm: Endpoint) -> int:
    """Tokens per KV-cache block (the unit the prefix cache shares)."""
    return int(
        next(
            k.split('block_size="')[1].split('"')[0]
            for k in vllm.server.metrics()
            if k.startswith("vllm:cache_config_info{")
        )
    )


def test_n_samples_prefill_the_prompt_once(vllm: Endpoint) -> None:
    llm = model(vllm)
    block = block_size(vllm)
    facts = " ".join(f"Fact {i}: {i} plus {i} is {2 * i}." for i in range(80))
    prompt = f"[{uuid.uuid4()}] {facts} Which fact is about 9?"  # never seen: no cache hit

    before = vllm.server.metrics()
    replies = llm.sample_n(prompt, seeds=[1, 2, 3, 4])
    after = vllm.server.metrics()

    assert len(vllm.proxy.chat_requests()) == 1
    assert all(isinstance(r, AIMessage) and r.content for r in replies), replies
    response = vllm.proxy.chat_requests()[0].response
    assert response is not None
    prompt_tokens = response["usage"]["prompt_tokens"]
    assert prompt_tokens > 3 * block, "the prompt must span several KV-cache blocks"

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    computed = grew("vllm:prompt_tokens_by_source_total", source="local_compute")
    hits = grew("vllm:prompt_tokens_by_source_total", source="local_cache_hit")
    assert grew("vllm:request_success_total") == N  # vLLM runs n=N as N sequences
    # Prefilled once: N x P prompt tokens were asked for, but beyond the first copy only each
    # sequence's partial last block was computed again; the full blocks came from the cache.
    assert computed + hits == N * prompt_tokens
    assert computed <= prompt_tokens + (N - 1) * block, (computed, hits, prompt_tokens)
    assert hits >= (N - 1) * (prompt_tokens // block) * block, (computed, hits, prompt_tokens)


def common_prefix(texts: list[str]) -> str:
    """The longest string every one of ``texts`` starts with."""
    first, last = min(texts), max(texts)
    size = next((i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), None)
    return first if size is None else first[:size]


CANDIDATE_PART_TOKENS = 64
"""At most this many prompt tokens of a judge call follow its shared prefix: the fenced short
candidate and the chat template's closing tokens."""


def test_judge_calls_share_their_prefix_in_the_prefix_cache(vllm: Endpoint) -> None:
    """The N judge calls of a run send the instructions and the conversation first, the same
    bytes in each; only the fenced candidate at the end differs. vLLM computes that prefix
    once and serves its full blocks from the prefix cache to the other calls (one call at a
    time here, so each finds the blocks the one before computed)."""
    block = block_size(vllm)
    facts = " ".join(f"Fact {i}: {i} plus {i} is {2 * i}." for i in range(60))
    question = f"[{uuid.uuid4()}] {facts} Which fact is about 9?"  # never seen: no cache hit
    candidates = FakeChatModel(replies=[f"Fact {i} is about 9." for i in range(N)])
    judge = model(vllm, temperature=0.0, max_tokens=8, max_concurrency=1)

    before = vllm.server.metrics()
    result = best_of_n(candidates, n=N, selector=LLMJudge(judge)).run(question)
    after = vllm.server.metrics()

    posts = vllm.proxy.chat_requests()
    assert len(posts) == N and [p.status for p in posts] == [200] * N
    assert [c.ok for c in result.candidates] == [True] * N
    bodies = [p.body for p in posts if p.body is not None]
    assert len({repr(b["messages"][0]) for b in bodies}) == 1  # one system message, verbatim
    users = [b["messages"][-1]["content"] for b in bodies]
    shared = common_prefix(users)
    assert question in shared and "Candidate reply, fenced as data:\n<candidate" in shared
    assert all(len(u) - len(shared) < 4 * CANDIDATE_PART_TOKENS for u in users)

    prompt_tokens = min(p.response["usage"]["prompt_tokens"] for p in posts if p.response)
    shared_blocks = (prompt_tokens - CANDIDATE_PART_TOKENS) // block
    assert shared_blocks >= 3, "the shared prefix must span several KV-cache blocks"
    hits = metric(after, "vllm:prompt_tokens_by_source_total", source="local_cache_hit") - metric(
        before, "vllm:prompt_tokens_by_source_total", source="local_cache_hit"
    )
    # Every call after the first found the shared prefix's full blocks in the cache.
    assert hits >= (N - 1) * shared_blocks * block, (hits, prompt_tokens, block)


def test_best_of_n_with_llm_judge(vllm: Endpoint, mode: Mode) -> None:
    llm = model(vllm)
    judge = model(vllm, temperature=0.0)
    result = mode.run(best_of_n(llm, n=N, selector=LLMJudge(judge)), "What is 3 + 4?")

    posts = vllm.proxy.chat_requests()
    ns = [p.body.get("n") if p.body else None for p in posts]
    assert ns[0] == N and ns[1:] == [None] * N  # one fan-out request, then N judge calls
    assert [c.ok for c in result.candidates] == [True] * N
    assert result.decision.selected_index in range(N)
    assert result.message.content == result.candidates[result.decision.selected_index].text


def test_separate_requests_respect_the_endpoint_limit(vllm: Endpoint, mode: Mode) -> None:
    llm = model(vllm, supports_n=False, max_concurrency=2)
    result = mode.run(best_of_n(llm, n=6, selector=lambda messages, c: -len(c.text)), "Hi!")

    posts = vllm.proxy.chat_requests()
    assert len(posts) == 6
    assert all(p.body is not None and "n" not in p.body for p in posts)
    # Per-candidate seeds: each separate request carries its own candidate's seed.
    seeds = sorted(p.body["seed"] for p in posts if p.body)
    assert seeds == sorted(c.seed for c in result.candidates if c.seed is not None)
    assert len(set(seeds)) == 6
    assert vllm.proxy.peak == 2, "at most 2 in flight, and the 6 calls did overlap"
    assert [c.ok for c in result.candidates] == [True] * 6
