"""Misuse fails when the step is built, with a message that says what to do."""

from __future__ import annotations

from typing import Any

import pytest
from langgraph.types import RetryPolicy

from fusion_graph import LLMJudge, MajorityVote, best_of_n, create_fusion_graph, fusion_of_n
from fusion_graph.nodes.fanout import MAX_CANDIDATES
from fusion_graph.testing import FakeChatModel
from tests.conftest import Mode

llm = FakeChatModel()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 0}, ValueError, "n must be positive"),
        ({"n": -2}, ValueError, "n must be positive"),
        ({"n": MAX_CANDIDATES + 1}, ValueError, "above the cap of 256"),
        ({"n": 2.5}, TypeError, "n must be an int"),
        ({"n": 2, "fusor": None}, ValueError, "fusion needs a fusor"),
        ({"n": 2, "fusor": "gpt-4o"}, TypeError, "fusor must be a chat model"),
        ({"n": 2, "min_candidates": 3}, ValueError, "cannot exceed n=2"),
        ({"n": 2, "min_candidates": 0}, ValueError, "min_candidates must be positive"),
        ({"n": 2, "max_concurrency": 0}, ValueError, "max_concurrency must be positive"),
        ({"n": 2, "timeout": 0}, ValueError, "timeout must be positive"),
        ({"n": 2, "retry": 3}, TypeError, "RetryPolicy"),
        ({"n": 2, "critic": "model"}, TypeError, "critic must be"),
        ({"n": 2, "temperature": -1.0}, ValueError, "temperature must be >= 0"),
        ({"n": 2, "fallback": "vote"}, TypeError, "fallback must be a Selector"),
    ],
)
def test_fusion_of_n_rejects_bad_options(kwargs: dict[str, Any], error: type, match: str) -> None:
    options = {"fusor": llm, **kwargs}
    with pytest.raises(error, match=match):
        fusion_of_n(llm, **options)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"selector": None}, ValueError, "best_of_n needs a selector"),
        ({"selector": llm}, TypeError, "LLMJudge\\(model\\)"),
        ({"selector": 3}, TypeError, "selector must be a Selector"),
    ],
)
def test_best_of_n_rejects_bad_selectors(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        best_of_n(llm, n=2, **kwargs)


def test_judges_need_models() -> None:
    with pytest.raises(TypeError, match="LLMJudge needs a chat model"):
        LLMJudge("gpt-4o")  # type: ignore[arg-type]


@pytest.mark.parametrize("step", [42, "a model name", None])
def test_step_must_be_runnable_or_callable(step: Any) -> None:
    with pytest.raises(TypeError, match="expected a chat model, a Runnable or a LangGraph node"):
        fusion_of_n(step, n=2, fusor=llm)


def test_empty_pool_and_mixed_pool() -> None:
    with pytest.raises(ValueError, match="pool is empty"):
        fusion_of_n([], n=2, fusor=llm)
    with pytest.raises(TypeError, match="cannot mix"):
        fusion_of_n([llm, lambda state: state], n=2, fusor=llm)


def test_graph_strategy_needs_matching_decider() -> None:
    with pytest.raises(ValueError, match="strategy must be"):
        create_fusion_graph(llm, n=2, strategy="vote", fusor=llm)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fusion takes a fusor, not a selector"):
        create_fusion_graph(llm, n=2, strategy="fusion", fusor=llm, selector=MajorityVote())
    with pytest.raises(ValueError, match="best_of_n takes a selector, not a fusor"):
        create_fusion_graph(llm, n=2, strategy="best_of_n", selector=MajorityVote(), fusor=llm)
    with pytest.raises(ValueError, match="best_of_n needs a selector"):
        create_fusion_graph(llm, n=2, strategy="best_of_n")


@pytest.mark.parametrize("prompt", ["", "   ", [], [("user", "  ")]])
def test_empty_prompt_is_rejected_before_any_call(mode: Mode, prompt: Any) -> None:
    fused = fusion_of_n(llm, n=2, fusor=llm)
    with pytest.raises(ValueError, match="the prompt is empty"):
        mode.invoke(fused, prompt)


def test_wrong_input_type(mode: Mode) -> None:
    with pytest.raises(TypeError, match="expected a string, messages"):
        mode.invoke(fusion_of_n(llm, n=2, fusor=llm), 42)


def test_retry_policy_is_accepted() -> None:
    fusion_of_n(llm, n=2, fusor=llm, retry=RetryPolicy(max_attempts=2), timeout=5)
