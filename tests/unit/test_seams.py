"""The public seams of the core: deciders on candidates the caller already has, the
fan-out on its own, typed progress events, the options object, the error hierarchy, the
usage arithmetic and the import boundaries."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest
from langchain_core.messages import AIMessage

import fusion_graph
from fusion_graph import (
    Candidate,
    Fuse,
    FusionGraphError,
    LLMJudge,
    MajorityVote,
    NotEnoughCandidatesError,
    Select,
    TokenUsage,
    best_of_n,
    fusion_of_n,
)
from fusion_graph.events import FusionEvent
from fusion_graph.messages import to_messages
from fusion_graph.nodes.fanout import FanOut
from fusion_graph.nodes.generator import generator_pool
from fusion_graph.options import FusionOptions
from fusion_graph.runtime import Caller
from fusion_graph.testing import CallRecorder, FakeCall, FakeChatModel
from tests.conftest import Mode


def test_fuse_decides_among_given_strings(mode: Mode) -> None:
    rec = CallRecorder()
    fusor = FakeChatModel(replies=["Paris (fused)"], recorder=rec)
    fuse = Fuse(fusor)
    message, decision = mode.call(
        lambda: fuse.decide("Capital of France?", ["Paris", "Lyon"]),
        lambda: fuse.adecide("Capital of France?", ["Paris", "Lyon"]),
    )
    assert message.content == "Paris (fused)"
    assert decision.fused and decision.strategy == "fusion"
    [call] = rec.by_role("fusor")
    assert '<candidate index="0">\nParis\n</candidate>' in call.prompt
    assert '<candidate index="1">\nLyon\n</candidate>' in call.prompt


def test_select_decides_among_given_messages_and_candidates(mode: Mode) -> None:
    select = Select(MajorityVote())
    answers: list[Any] = [AIMessage(content="4"), AIMessage(content="5"), AIMessage(content="4")]
    message, decision = mode.call(
        lambda: select.decide("2 + 2?", answers), lambda: select.adecide("2 + 2?", answers)
    )
    assert (message.content, decision.selected_index) == ("4", 0)
    given = [Candidate.of(a, index=i + 10) for i, a in enumerate(["x", "y", "y"])]
    message, decision = mode.call(
        lambda: select.decide("q", given), lambda: select.adecide("q", given)
    )
    assert (message.content, decision.selected_index) == ("y", 11)


def test_a_failing_judge_on_given_candidates_falls_back_to_the_vote() -> None:
    judge = FakeChatModel(replies=["no verdict here"])
    message, decision = Select(LLMJudge(judge)).decide("q", ["a", "b", "b"])
    assert decision.fallback and decision.method == "majority_vote"
    assert message.content == "b"


def test_fan_out_on_its_own_makes_seeded_candidates_from_a_pool() -> None:
    a = FakeChatModel(replies=lambda c: f"a{c.kwargs.get('seed')}", model_name="a")
    b = FakeChatModel(replies=lambda c: f"b{c.kwargs.get('seed')}", model_name="b")
    fan_out = FanOut(generators=generator_pool([a, b]), n=4, seed=7)
    made = asyncio.run(
        fan_out.generate("q", to_messages("q"), {}, caller=Caller.for_run(sync=False))
    )
    assert [g.candidate.text for g in made] == ["a7", "b8", "a9", "b10"]
    assert [g.candidate.seed for g in made] == [7, 8, 9, 10]
    assert [g.candidate.model for g in made] == ["a", "b", "a", "b"]


def test_on_event_receives_typed_events_in_order(mode: Mode) -> None:
    events: list[FusionEvent] = []
    fused = fusion_of_n(FakeChatModel(replies=["x", "y"]), n=2, fusor=FakeChatModel())
    mode.call(
        lambda: fused.run("q", on_event=events.append),
        lambda: fused.arun("q", on_event=events.append),
    )
    kinds = [e["event"] for e in events]
    assert kinds.count("candidate_started") == 2 and kinds.count("candidate_finished") == 2
    assert kinds[-2:] == ["decision_started", "decision"]
    finished = sorted(
        (e for e in events if e["event"] == "candidate_finished"), key=lambda e: e["index"]
    )
    assert [(e["index"], e["ok"]) for e in finished] == [(0, True), (1, True)]


def test_on_token_receives_the_fusors_chunks() -> None:
    chunks: list[str] = []
    fused = fusion_of_n(
        FakeChatModel(replies=["x"]), n=2, fusor=FakeChatModel(replies=["one two three"])
    )
    result = fused.run("q", on_token=lambda c: chunks.append(str(c.content)))
    assert "".join(chunks) == "one two three" == result.message.content


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": None}, TypeError, r"n must be an int, got NoneType"),
        ({"n": 0}, ValueError, r"n must be positive \(1 to 256\), got 0"),
        ({"n": 2, "seed": "1"}, TypeError, r"seed must be an int or None, got str"),
        ({"n": 2, "timeout": "5"}, TypeError, r"timeout must be a number, got str"),
        ({"n": 2, "max_concurrency": 1.5}, TypeError, r"max_concurrency must be an int"),
        ({"n": 2, "temperature": True}, TypeError, r"temperature must be a number"),
    ],
)
def test_options_name_the_bad_option(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        FusionOptions(strategy="fusion", fusor=FakeChatModel(), **kwargs)


def test_options_are_frozen_and_build_the_matching_decider() -> None:
    options = FusionOptions(n=3, strategy="best_of_n", selector=MajorityVote())
    assert isinstance(options.decider(), Select)
    assert isinstance(options.fallback, MajorityVote)
    with pytest.raises(AttributeError):
        options.n = 4  # type: ignore[misc]


def test_not_enough_candidates_is_a_fusion_graph_error_and_an_exception_group() -> None:
    failing = FakeChatModel(replies=[RuntimeError("down")])
    with pytest.raises(FusionGraphError) as caught:
        best_of_n(failing, n=2, selector=MajorityVote()).invoke("q")
    assert isinstance(caught.value, NotEnoughCandidatesError)
    assert isinstance(caught.value, ExceptionGroup)
    assert [str(e) for e in caught.value.exceptions] == ["down", "down"]


def test_token_usage_total_is_derived_and_summed_in_one_place() -> None:
    a, b = TokenUsage(input_tokens=3, output_tokens=4), TokenUsage(input_tokens=1)
    assert a.total_tokens == 7 and a.model_dump()["total_tokens"] == 7
    assert TokenUsage.sum([a, None, b]) == TokenUsage(input_tokens=4, output_tokens=4)
    assert TokenUsage.sum([None]) is None


def test_result_usage_adds_candidates_critiques_and_decision() -> None:
    def usage_of(call: FakeCall) -> AIMessage:
        return AIMessage(
            content="r",
            usage_metadata={"input_tokens": 2, "output_tokens": 1, "total_tokens": 3},
        )

    model = FakeChatModel(replies=usage_of, usage=False)
    result = fusion_of_n(model, n=2, fusor=model, critic=model).run("q")
    assert result.usage == TokenUsage(input_tokens=10, output_tokens=5)  # 2 + 2 + 1 calls


def test_public_surface_is_small_and_versioned() -> None:
    assert 15 <= len(fusion_graph.__all__) <= 20
    assert fusion_graph.__version__ and fusion_graph.__version__ != "0+unknown"
    assert all(hasattr(fusion_graph, name) for name in fusion_graph.__all__)


def test_the_library_imports_neither_typer_nor_rich() -> None:
    # With typer and rich made unimportable, the library still imports (httpx, which
    # langgraph imports, loads rich for its own optional CLI when rich is installed; it
    # falls back when it is not), and nothing of the command line is loaded.
    code = (
        "import sys; sys.modules.update(typer=None, rich=None); "
        "import fusion_graph, fusion_graph.batch, fusion_graph.models, fusion_graph.testing; "
        "print(sorted(m for m in sys.modules if m.startswith('fusion_graph.cli')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
