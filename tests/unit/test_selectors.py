"""Best-of-N selectors: each one's choice, validation of judge output, fallbacks."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from langchain_core.messages import AIMessage, BaseMessage

from fusion_graph import (
    Candidate,
    DecisionError,
    LLMJudge,
    MajorityVote,
    PairwiseJudge,
    best_of_n,
)
from fusion_graph.nodes.judges import parse_judge_output, parse_pairwise_output
from fusion_graph.nodes.select import final_answer
from fusion_graph.testing import CallRecorder, FakeCall, FakeChatModel, tool_call
from tests.conftest import Mode, meeting_model

TEXTS = ["answer zero", "answer one", "answer two", "answer three"]


def _judge_by_content(scores: dict[str, int]) -> FakeChatModel:
    """A judge that scores the candidate whose text it sees."""

    def reply(call: FakeCall) -> str:
        for text, score in scores.items():
            if f"\n{text}\n</candidate>" in call.last:
                return json.dumps({"score": score, "rationale": f"{text} scored {score}"})
        return "no idea"

    return FakeChatModel(replies=reply, model_name="judge")


def test_llm_judge_picks_highest_score(mode: Mode) -> None:
    judge = _judge_by_content(
        {"answer zero": 3, "answer one": 9, "answer two": 7, "answer three": 9}
    )
    best = best_of_n(FakeChatModel(replies=TEXTS), n=4, selector=LLMJudge(judge))
    result = mode.run(best, "q?")
    d = result.decision
    assert d.selected_index == 1  # 9 twice: the lower index wins the tie
    assert d.score == 9 and d.scores == {0: 3, 1: 9, 2: 7, 3: 9}
    assert d.rationale == "answer one scored 9"
    assert result.message.content == "answer one"
    assert d.method == "llm_judge:judge" and not d.fallback


def test_llm_judge_garbage_falls_back(mode: Mode) -> None:
    judge = FakeChatModel(replies=['{"best": 2017}'])
    result = mode.run(best_of_n(FakeChatModel(replies=TEXTS), n=3, selector=LLMJudge(judge)), "q")
    assert result.decision.fallback
    assert result.decision.method == "majority_vote"
    assert result.decision.fallback_reason is not None
    assert "no valid 1-10 score" in result.decision.fallback_reason


def test_llm_judge_garbage_without_fallback_raises(mode: Mode) -> None:
    judge = FakeChatModel(replies=["I like them all"])
    best = best_of_n(FakeChatModel(), n=2, selector=LLMJudge(judge), fallback=None)
    with pytest.raises(DecisionError, match="judge"):
        mode.invoke(best, "q")


def test_llm_judge_unscored_candidates_rank_below_scored(mode: Mode) -> None:
    judge = _judge_by_content({"answer two": 2})
    result = mode.run(best_of_n(FakeChatModel(replies=TEXTS), n=4, selector=LLMJudge(judge)), "q")
    assert result.decision.selected_index == 2 and result.decision.scores == {2: 2}


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ('{"score": 7, "rationale": "fine"}', 7),
        ('Sure! ```json\n{"score": "8"}\n```', 8),
        ("Score: 6/10", 6),
        ("9", 9),
        ('{"score": 0}', 1),  # clamped into 1-10
        ('{"score": 10.0}', 10),
        ('{"score": 2017}', None),  # nonsense is rejected, not clamped
        ('{"score": -3}', None),
        ('{"best": 2}', None),
        ("great answer", None),
        ('{"score": true}', None),
    ],
)
def test_parse_judge_output(text: str, score: float | None) -> None:
    assert parse_judge_output(text)[0] == score


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ('{"winner": "A"}', "A"),
        ('{"winner": "b", "rationale": "x"}', "B"),
        ('{"winner": "Tie"}', "tie"),
        ("Winner: B", "B"),
        ("A", "A"),
        ("Both are good", None),
        ('{"winner": "C"}', None),
    ],
)
def test_parse_pairwise_output(text: str, verdict: str | None) -> None:
    assert parse_pairwise_output(text) == verdict


def _pairwise_preferring(best: str, recorder: CallRecorder | None = None) -> FakeChatModel:
    """A consistent judge: prefers the candidate containing ``best``, else the later index."""

    def reply(call: FakeCall) -> str:
        a, b = call.last.split("Candidate B")
        if best in a:
            return '{"winner": "A"}'
        if best in b:
            return '{"winner": "B"}'
        return '{"winner": "tie"}'

    return FakeChatModel(replies=reply, recorder=recorder)


def test_pairwise_tournament_finds_the_best(mode: Mode) -> None:
    rec = CallRecorder()
    texts = ["a", "b", "c", "the best", "e"]
    selector = PairwiseJudge(_pairwise_preferring("the best", rec))
    result = mode.run(best_of_n(FakeChatModel(replies=texts), n=5, selector=selector), "q")
    assert result.decision.selected_index == 3
    assert result.message.content == "the best"
    # 5 candidates: rounds of 2 + 1 + 1 matches, each judged in both orders.
    assert len(rec.by_role("judge")) == 2 * (2 + 1 + 1)
    assert result.decision.scores[3] == 3  # beat 2, then 0, then 4 (the bye)


def test_pairwise_cancels_position_bias(mode: Mode) -> None:
    """A judge that always says "A" gives each side one vote: every match is a draw, which
    goes to the lower index, instead of to whoever happened to be shown first."""
    selector = PairwiseJudge(FakeChatModel(replies=['{"winner": "A"}']))
    result = mode.run(best_of_n(FakeChatModel(replies=TEXTS), n=4, selector=selector), "q")
    assert result.decision.selected_index == 0
    assert not result.decision.fallback


def test_pairwise_garbage_falls_back(mode: Mode) -> None:
    selector = PairwiseJudge(FakeChatModel(replies=["hmm"]))
    result = mode.run(best_of_n(FakeChatModel(replies=TEXTS), n=3, selector=selector), "q")
    assert result.decision.fallback and result.decision.method == "majority_vote"


def test_majority_vote_normalises_answers(mode: Mode) -> None:
    texts = ["So the answer is 1,000.", "I think 999", "#### 1000", "**1000**"]
    result = mode.run(best_of_n(FakeChatModel(replies=texts), n=4, selector=MajorityVote()), "q")
    assert result.decision.selected_index == 0
    assert result.decision.score == 0.75
    assert result.decision.scores == {0: 0.75, 1: 0.25, 2: 0.75, 3: 0.75}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("The answer is Paris.", "paris"),
        ("\\boxed{42}", "42"),
        ("work...\n#### 1,234", "1234"),
        ("  Hello   World!  ", "hello world"),
        ("The answer is:\nParis", "paris"),
    ],
)
def test_final_answer(text: str, key: str) -> None:
    assert final_answer(text) == key


def test_majority_vote_on_tool_calls(mode: Mode) -> None:
    paris = tool_call("weather", {"city": "Paris", "unit": "C"})
    rome = tool_call("weather", {"city": "Rome"})
    replies = [
        AIMessage(content="", tool_calls=[rome]),
        AIMessage(content="", tool_calls=[{**paris, "id": "x1"}]),
        AIMessage(
            content="checking",
            tool_calls=[{**paris, "id": "x2", "args": {"unit": "C", "city": "Paris"}}],
        ),
    ]
    result = mode.run(best_of_n(FakeChatModel(replies=replies), n=3, selector=MajorityVote()), "q")
    assert result.decision.selected_index == 1
    # BoN returns the winner's tool calls untouched (id included).
    assert result.message.tool_calls[0]["id"] == "x1"
    assert result.message.tool_calls[0]["args"] == {"city": "Paris", "unit": "C"}


def test_reward_function_sync_and_async(mode: Mode) -> None:
    def longest(messages: Sequence[BaseMessage], candidate: Candidate) -> float:
        assert messages[-1].content == "q"
        return float(len(candidate.text))

    async def alongest(messages: Sequence[BaseMessage], candidate: Candidate) -> float:
        return float(len(candidate.text))

    texts = ["hi", "a longer answer", "mid one"]
    for fn in (longest, alongest):
        result = mode.run(best_of_n(FakeChatModel(replies=texts), n=3, selector=fn), "q")
        assert result.decision.selected_index == 1
        assert result.decision.method == f"reward:{fn.__name__}"
        assert result.decision.scores == {0: 2.0, 1: 15.0, 2: 7.0}


def test_reward_errors_leave_candidates_unscored(mode: Mode) -> None:
    def picky(messages: Sequence[BaseMessage], candidate: Candidate) -> float:
        if candidate.index == 0:
            raise ValueError("cannot score")
        return float("nan") if candidate.index == 1 else 1.0

    result = mode.run(best_of_n(FakeChatModel(replies=TEXTS), n=3, selector=picky), "q")
    assert result.decision.scores == {2: 1.0} and result.decision.selected_index == 2


def test_selector_sees_critiques(mode: Mode) -> None:
    rec = CallRecorder()
    critic = FakeChatModel(replies=lambda call: f"Flawed. Score: {call.index + 1}/10")
    judge = FakeChatModel(replies=['{"score": 5}'], recorder=rec)
    best = best_of_n(FakeChatModel(replies=TEXTS), n=2, selector=LLMJudge(judge), critic=critic)
    mode.invoke(best, "q")
    assert all("Critique (score" in c.last for c in rec.by_role("judge"))


def test_judge_calls_run_in_parallel(mode: Mode) -> None:
    rec = CallRecorder()
    judge = meeting_model(6, rec, threads=mode.sync, replies=['{"score": 5}'])
    mode.invoke(best_of_n(FakeChatModel(replies=TEXTS), n=6, selector=LLMJudge(judge)), "q")
    assert rec.max_in_flight == 6
