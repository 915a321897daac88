"""The default embedded model's answers and verdicts, run for real (Qwen2.5-Coder-1.5B-Instruct
through llama.cpp): fused answers that do not loop, judge verdicts that are always valid and
graded, structured output.

These tests name the default model explicitly: the other integration tests run the fastest
packaged model (tests/conftest.py)."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import HumanMessage
from pydantic import BaseModel

pytest.importorskip(
    "llama_cpp", reason="needs the 'local' extra: pip install 'fusion-graph[local]'"
)

from fusion_graph import LLMJudge, PairwiseJudge, best_of_n, fusion_of_n
from fusion_graph.batch.data import builtin_eval_set, read_prompts
from fusion_graph.integrations.llama_cpp import ChatLocalModel
from fusion_graph.integrations.llama_cpp_models import DEFAULT_MODEL
from fusion_graph.integrations.repeat_guard import repeated_sentences

pytestmark = pytest.mark.integration

DEMO_QUESTION = "How many legs does an insect have? Answer with a number."  # make demo's
OPEN_QUESTION = "What is the capital of France, and what is it famous for?"  # a long answer


@pytest.fixture(scope="module")
def llm() -> ChatLocalModel:
    """The default model as `fusion-graph ask` samples candidates."""
    return ChatLocalModel(model=DEFAULT_MODEL, temperature=0.8, max_tokens=128)


def _eval_prompts(count: int) -> list[str]:
    return [item.prompt for item in read_prompts(builtin_eval_set()).items[:count]]


def test_no_fused_answer_repeats_a_sentence(llm: ChatLocalModel) -> None:
    """Over the demo question, an open question and 20 eval prompts, no fused answer (nor
    any candidate) says a sentence three times or more."""
    fused = fusion_of_n(llm, n=4, fusor=llm.bind(temperature=0.2), seed=0)
    prompts = [DEMO_QUESTION, OPEN_QUESTION, *_eval_prompts(20)]

    async def run_all() -> list[tuple[str, list[str]]]:
        out = []
        for prompt in prompts:
            result = await fused.arun(prompt)
            out.append((str(result.message.text), [c.text for c in result.candidates]))
        return out

    looping = []
    for prompt, (answer, candidates) in zip(prompts, asyncio.run(run_all()), strict=True):
        assert answer.strip(), f"empty fused answer to {prompt!r}"
        for text in (answer, *candidates):
            counts = repeated_sentences(text)
            if any(count >= 3 for count in counts.values()):
                looping.append((prompt, text))
    assert looping == []


def test_judge_verdicts_are_valid_and_graded(llm: ChatLocalModel) -> None:
    """The pointwise judge answers under the JSON schema on every call (no fallback to a
    vote), and its scores are probability-weighted expectations, not only whole digits."""
    judge = LLMJudge(llm.bind(temperature=0.0, max_tokens=48))
    best = best_of_n(llm.bind(max_tokens=48), n=4, selector=judge, seed=0)
    scores: list[float] = []
    for prompt in _eval_prompts(3):
        result = best.run(prompt)
        decision = result.decision
        assert not decision.fallback, decision.fallback_reason
        assert sorted(decision.scores) == [0, 1, 2, 3], "a verdict was missing"
        scores += decision.scores.values()
    assert all(1.0 <= s <= 10.0 for s in scores)
    assert any(s != round(s) for s in scores), f"only whole-digit scores: {scores}"


def test_pairwise_verdicts_are_valid(llm: ChatLocalModel) -> None:
    """The pairwise tournament gets a schema-valid verdict in every match."""
    judge = PairwiseJudge(llm.bind(temperature=0.0, max_tokens=48))
    best = best_of_n(llm.bind(max_tokens=48), n=3, selector=judge, seed=0)
    for prompt in _eval_prompts(2):
        decision = best.run(prompt).decision
        assert not decision.fallback, decision.fallback_reason
        assert decision.selected_index in (0, 1, 2)


class Capital(BaseModel):
    city: str
    country: str


def test_with_structured_output_parses_into_the_schema(llm: ChatLocalModel) -> None:
    greedy = llm.model_copy(update={"temperature": 0.0})
    structured = greedy.with_structured_output(Capital)
    answer = structured.invoke([HumanMessage("What is the capital of France?")])
    assert isinstance(answer, Capital)
    assert "paris" in answer.city.lower()
    assert "france" in answer.country.lower()

    raw = greedy.with_structured_output(Capital, include_raw=True).invoke(
        "What is the capital of Japan? Reply with the city and the country."
    )
    assert set(raw) == {"raw", "parsed", "parsing_error"}
    assert raw["parsing_error"] is None
    assert isinstance(raw["parsed"], Capital)
    assert Capital.model_validate_json(raw["raw"].content) == raw["parsed"]
