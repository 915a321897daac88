"""The embedded local chat model, run for real (SmolLM2-135M-Instruct through llama.cpp)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncGenerator, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, closing

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)

pytest.importorskip(
    "llama_cpp", reason="needs the 'local' extra: pip install 'fusion-graph[local]'"
)

from fusion_graph.integrations.llama_cpp import ChatLocalModel, default_model_path

pytestmark = pytest.mark.integration

PROMPT = [
    SystemMessage("You are a concise assistant."),
    HumanMessage("Name one animal that lives in the sea and say why it is interesting."),
]


@pytest.fixture(scope="module")
def model() -> ChatLocalModel:
    return ChatLocalModel(max_tokens=24, temperature=0.7)


def _lock_is_free(model: ChatLocalModel) -> bool:
    return not model._loaded().lock.locked()


def test_default_model_path_points_at_the_bundled_gguf() -> None:
    path = default_model_path()
    assert path.is_file()
    assert path.suffix == ".gguf"


def test_invoke_returns_text_with_usage(model: ChatLocalModel) -> None:
    reply = model.invoke(PROMPT)
    assert isinstance(reply, AIMessage)
    assert reply.text.strip()
    usage = reply.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] > 0
    assert usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert reply.response_metadata["model_name"] == "SmolLM2-135M-Instruct"
    assert reply.response_metadata["finish_reason"] in {"stop", "length"}


async def test_ainvoke_returns_text_with_usage(model: ChatLocalModel) -> None:
    reply = await model.ainvoke(PROMPT)
    assert reply.text.strip()
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["output_tokens"] > 0


def test_stream_yields_chunks_that_add_up(model: ChatLocalModel) -> None:
    chunks = list(model.stream(PROMPT, max_tokens=32))
    texts = [c.text for c in chunks if c.text]
    assert len(texts) >= 3
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert isinstance(total, AIMessageChunk)
    assert total.text == "".join(texts)
    assert total.text.strip()
    assert total.usage_metadata is not None
    assert total.usage_metadata["input_tokens"] > 0
    assert total.usage_metadata["output_tokens"] > 0
    assert total.response_metadata["finish_reason"] in {"stop", "length"}


async def test_astream_yields_chunks_that_add_up(model: ChatLocalModel) -> None:
    chunks = [c async for c in model.astream(PROMPT, max_tokens=32)]
    texts = [c.text for c in chunks if c.text]
    assert len(texts) >= 3
    assert "".join(texts).strip()
    assert chunks[-1].usage_metadata is not None
    assert chunks[-1].usage_metadata["output_tokens"] > 0


def test_stopping_a_stream_early_releases_the_model(model: ChatLocalModel) -> None:
    stream = model.stream(PROMPT, max_tokens=200)
    assert isinstance(stream, Generator)
    with closing(stream) as chunks:
        next(chunks)
        assert not _lock_is_free(model)
    assert _lock_is_free(model)
    assert model.invoke(PROMPT, max_tokens=4).text


async def test_stopping_an_astream_early_releases_the_model(model: ChatLocalModel) -> None:
    story: list[BaseMessage] = [HumanMessage("Write a very long story about a dragon.")]
    # Closing the stream itself releases the lock at once.
    inner = model._astream(story, max_tokens=300, temperature=0.0)
    assert isinstance(inner, AsyncGenerator)
    async with aclosing(inner) as chunks:
        async for _ in chunks:
            assert not _lock_is_free(model)
            break
    assert _lock_is_free(model)
    # Through the public API, LangChain closes the inner stream in a finaliser task: the lock
    # is released within a token or two, long before the 300 tokens would be done.
    outer = model.astream(story, max_tokens=300, temperature=0.0)
    assert isinstance(outer, AsyncGenerator)
    async with aclosing(outer) as public:
        async for _ in public:
            break
    for _ in range(200):
        if _lock_is_free(model):
            break
        await asyncio.sleep(0.01)
    assert _lock_is_free(model)
    assert (await model.ainvoke(PROMPT, max_tokens=4)).text


def test_same_seed_gives_same_text(model: ChatLocalModel) -> None:
    first = model.invoke(PROMPT, seed=1234, temperature=0.9)
    second = model.invoke(PROMPT, seed=1234, temperature=0.9)
    assert first.text == second.text
    assert first.response_metadata["seed"] == 1234


def test_sample_n_gives_independent_candidates_from_one_prompt_pass(
    model: ChatLocalModel,
) -> None:
    seeds = [11, 22, 33, 44]
    replies = model.sample_n(PROMPT, seeds=seeds, temperature=0.9, max_tokens=32)
    assert len(replies) == 4
    texts = []
    for seed, reply in zip(seeds, replies, strict=True):
        assert isinstance(reply, AIMessage), reply
        assert reply.text.strip()
        usage = reply.usage_metadata
        assert usage is not None
        assert usage["output_tokens"] > 0
        meta = reply.response_metadata
        assert meta["batched"] is True
        assert meta["batch_size"] == 4
        assert meta["seed"] == seed
        assert meta["finish_reason"] in {"stop", "length"}
        # The prompt was decoded once for the whole batch, not once per candidate.
        assert meta["prompt_eval_tokens"] == usage["input_tokens"]
        assert meta["latency_s"] > 0
        texts.append(reply.text)
    assert len(set(texts)) >= 3
    # The prompt is the one create_chat_completion sees (same chat template, same tokens).
    single = model.invoke(PROMPT, max_tokens=1)
    first = replies[0]
    assert isinstance(first, AIMessage)
    assert single.usage_metadata is not None
    assert first.usage_metadata is not None
    assert first.usage_metadata["input_tokens"] == single.usage_metadata["input_tokens"]


async def test_asample_n_is_reproducible_and_reports_bad_seeds(model: ChatLocalModel) -> None:
    first = await model.asample_n(PROMPT, seeds=[5, 6], temperature=0.9, max_tokens=16)
    second = await model.asample_n(PROMPT, seeds=[5, -1, 6], temperature=0.9, max_tokens=16)
    assert isinstance(second[1], ValueError)
    assert [m.text for m in first if isinstance(m, AIMessage)] == [
        m.text for m in (second[0], second[2]) if isinstance(m, AIMessage)
    ]
    assert all(isinstance(m, AIMessage) for m in first)
    assert second[0].response_metadata["batch_size"] == 2  # type: ignore[union-attr]


def test_sample_n_honours_stop_sequences(model: ChatLocalModel) -> None:
    prompt = [HumanMessage("Count from 1 to 10, separated by commas.")]
    replies = model.sample_n(prompt, seeds=[1, 2], temperature=0.0, max_tokens=32, stop=["5"])
    for reply in replies:
        assert isinstance(reply, AIMessage)
        assert "5" not in reply.text
        assert reply.response_metadata["finish_reason"] == "stop"


def test_instances_share_one_loaded_model(model: ChatLocalModel) -> None:
    other = ChatLocalModel(max_tokens=8, temperature=0.2)
    assert other._loaded() is model._loaded()


def test_threads_on_two_instances_never_crash(model: ChatLocalModel) -> None:
    other = ChatLocalModel(max_tokens=12, temperature=0.9)
    instances = [model, other] * 4

    def call(m: ChatLocalModel) -> AIMessage:
        return m.invoke(PROMPT, max_tokens=12)

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(call, instances))
    assert len(replies) == 8
    assert all(r.text.strip() for r in replies)


async def test_concurrent_ainvoke_never_crashes(model: ChatLocalModel) -> None:
    replies = await asyncio.gather(*(model.ainvoke(PROMPT, max_tokens=12) for _ in range(6)))
    assert all(r.text.strip() for r in replies)


def test_fan_out_in_a_subprocess_exits_cleanly() -> None:
    # A segfault would kill the process (exit -11 / 139); the parent test run survives it.
    script = textwrap.dedent(
        """
        import asyncio
        from concurrent.futures import ThreadPoolExecutor
        from fusion_graph.integrations.llama_cpp import ChatLocalModel

        a = ChatLocalModel(max_tokens=8)
        b = ChatLocalModel(max_tokens=8, temperature=0.2)
        prompt = "Say hello."

        def work(i):
            m = (a, b)[i % 2]
            if i % 4 == 0:
                return "".join(c.text for c in m.stream(prompt))
            if i % 4 == 1:
                return m.sample_n([("human", prompt)], seeds=[i, i + 1])[0].text
            return m.invoke(prompt).text

        with ThreadPoolExecutor(max_workers=8) as pool:
            texts = list(pool.map(work, range(8)))
        texts += [r.text for r in a.batch([prompt] * 4)]

        async def main():
            return await asyncio.gather(
                *(m.ainvoke(prompt) for m in (a, b, a)),
                a.asample_n([("human", prompt)], seeds=[1, 2, 3]),
            )

        texts += [r.text for r in asyncio.run(main())[:3]]
        assert all(t.strip() for t in texts), texts
        print(len(texts))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip() == "15"


def test_prompt_longer_than_the_context_raises_value_error() -> None:
    small = ChatLocalModel(n_ctx=64, max_tokens=8)
    long_prompt = [HumanMessage("word " * 200)]
    with pytest.raises(ValueError, match="context holds 64 tokens"):
        small.invoke(long_prompt)
    with pytest.raises(ValueError, match="context holds 64 tokens"):
        list(small.stream(long_prompt))
    with pytest.raises(ValueError, match="context holds 64 tokens"):
        small.sample_n(long_prompt, seeds=[1, 2])
    assert _lock_is_free(small)
    assert small.invoke("Hi").text.strip()


def test_a_seeded_call_answers_the_same_whatever_came_before() -> None:
    """Reproducible runs: llama.cpp's cached prefix of the previous prompt must not change the
    next reply (it did: a prompt decoded in pieces gives slightly other logits)."""
    model = ChatLocalModel(temperature=0.8, max_tokens=40, seed=7)
    before: list[object] = [None, "Tell me a joke.", [*PROMPT[:1], HumanMessage("Name a fish.")]]
    replies = []
    for previous in [*before, PROMPT]:  # the last one leaves PROMPT itself in the cache
        if previous is not None:
            model.invoke(previous)  # type: ignore[arg-type]
        replies.append(model.invoke(PROMPT).text)
    assert len(set(replies)) == 1, replies
