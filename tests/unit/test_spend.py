"""Spending compute where it pays: the straggler cut-off (``min_candidates`` + ``grace``),
the early-stopping vote (``MajorityVote(early_stop=...)``) and the token budget
(``max_total_tokens``). Fakes with scripted latencies; what is checked is structural:
which candidates were cancelled, which calls the fakes saw cancelled or never saw."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.types import Command, RetryPolicy, interrupt

from fusion_graph import (
    LLMJudge,
    MajorityVote,
    TokenUsage,
    best_of_n,
    create_fusion_graph,
    fusion_of_n,
)
from fusion_graph.nodes.select import EarlyStop
from fusion_graph.runtime import INDEX_KEY
from fusion_graph.testing import CallRecorder, FakeChatModel, tool_call
from tests.conftest import Mode

SLOW = 30.0  # a straggler: far longer than any test may take


def _wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    """A sync call is stopped on its worker thread a moment after the run moved on."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


# --- straggler cut-off ---------------------------------------------------------------------


def test_grace_cancels_stragglers_after_the_quorum(mode: Mode) -> None:
    rec = CallRecorder()
    gen = FakeChatModel(
        replies=["a", "b", "c", "d", "e"], delays=[0, 0, 0, SLOW, SLOW], recorder=rec
    )
    fusor = FakeChatModel(replies=["fused"], recorder=rec)
    step = fusion_of_n(gen, n=5, fusor=fusor, min_candidates=3, grace=0.05)

    result = mode.run(step, "q?")

    assert [c.status for c in result.candidates] == ["ok", "ok", "ok", "cancelled", "cancelled"]
    assert [c.stopped for c in result.candidates] == [None, None, None, "grace", "grace"]
    cancelled = result.candidates[3]
    assert cancelled.error is not None and "grace window" in cancelled.error.message
    assert cancelled.attempts == 1 and cancelled.seed is not None
    # The stragglers' calls were really cancelled at the fake, not left running.
    assert _wait_for(lambda: sorted(c.index or 0 for c in rec.cancelled) == [3, 4])
    [fusor_call] = rec.by_role("fusor")
    assert '<candidate index="2">' in fusor_call.prompt
    assert '<candidate index="3">' not in fusor_call.prompt
    assert result.decision.stopped == "grace" and result.decision.samples_used == 5
    assert result.decision.stop_reason and "grace window" in result.decision.stop_reason


def test_grace_waits_for_candidates_that_finish_inside_the_window(mode: Mode) -> None:
    rec = CallRecorder()
    gen = FakeChatModel(replies=["a", "b"], delays=[0, 0.05], recorder=rec)
    result = mode.run(fusion_of_n(gen, n=2, fusor=FakeChatModel(), grace=10.0), "q?")
    assert [c.status for c in result.candidates] == ["ok", "ok"]
    assert rec.cancelled == [] and result.decision.stopped is None


def test_failed_is_not_cancelled_and_does_not_count_for_the_quorum(mode: Mode) -> None:
    gen = FakeChatModel(replies=[RuntimeError("down"), "b", "c"], delays=[0, 0.02, SLOW])
    result = mode.run(fusion_of_n(gen, n=3, fusor=FakeChatModel(), grace=0.05), "q?")
    assert [c.status for c in result.candidates] == ["failed", "ok", "cancelled"]
    assert result.candidates[0].stopped is None and result.candidates[0].error is not None
    assert result.candidates[0].error.type == "RuntimeError"


def test_grace_in_the_subgraph_keeps_the_cancelled_candidates_in_state(mode: Mode) -> None:
    gen = FakeChatModel(replies=["a", "b", "c"], delays=[0, 0, SLOW])
    fusor = FakeChatModel(replies=["f"])
    graph = create_fusion_graph(gen, strategy="fusion", n=3, fusor=fusor, grace=0.05)
    state = mode.invoke(graph.compile(), {"messages": [("user", "q?")]})
    assert [c.status for c in state["candidates"]] == ["ok", "ok", "cancelled"]
    assert state["decision"].stopped == "grace"


# --- early-stopping vote ---------------------------------------------------------------------


def test_early_stop_vote_stops_when_the_first_answers_agree(mode: Mode) -> None:
    rec = CallRecorder()
    gen = FakeChatModel(replies=["The answer is 4."], recorder=rec)
    step = best_of_n(gen, n=8, selector=MajorityVote(early_stop=True))

    result = mode.run(step, "2+2?")

    # Rounds of 2: after 2 agreeing answers P = 0.875 (go on), after 4 P = 0.969 (stop).
    assert len(rec.by_role("generator")) == 4
    assert [c.status for c in result.candidates] == ["ok"] * 4 + ["cancelled"] * 4
    assert all(c.attempts == 0 and c.stopped == "early_stop" for c in result.candidates[4:])
    assert result.decision.samples_used == 4 and result.decision.stopped == "early_stop"
    assert result.decision.stop_reason and "P(leader ahead) = 0.969" in result.decision.stop_reason
    assert result.message.content == "The answer is 4."


def test_early_stop_vote_uses_all_n_when_answers_split(mode: Mode) -> None:
    rec = CallRecorder()
    gen = FakeChatModel(replies=["4", "5"], recorder=rec)
    result = mode.run(best_of_n(gen, n=8, selector=MajorityVote(early_stop=True)), "q?")
    assert len(rec.by_role("generator")) == 8
    assert all(c.ok for c in result.candidates)
    assert result.decision.stopped is None and result.decision.samples_used is None


def test_early_stop_vote_counts_tool_calls(mode: Mode) -> None:
    call = AIMessage(content="", tool_calls=[tool_call("search", {"q": "weather"})])
    rec = CallRecorder()
    gen = FakeChatModel(replies=[call], recorder=rec)
    vote = MajorityVote(early_stop=EarlyStop(threshold=0.9, round_size=3))
    result = mode.run(best_of_n(gen, n=9, selector=vote), "q?")
    # 3 agreeing tool calls: P = 0.9375 >= 0.9 after the first round.
    assert len(rec.by_role("generator")) == 3
    assert result.message.tool_calls[0]["name"] == "search"


def test_early_stop_rule() -> None:
    assert EarlyStop.confidence(4, 0) == pytest.approx(31 / 32)
    assert EarlyStop.confidence(3, 0) == pytest.approx(15 / 16)
    assert EarlyStop.confidence(5, 1) == pytest.approx(0.9375)
    assert EarlyStop.confidence(1, 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="threshold"):
        EarlyStop(threshold=1.0)
    with pytest.raises(ValueError, match="round_size"):
        EarlyStop(round_size=0)
    with pytest.raises(TypeError, match="early_stop must be an EarlyStop"):
        MajorityVote(early_stop=0.9)  # type: ignore[arg-type]


# --- token budget -----------------------------------------------------------------------------


def test_budget_stops_new_calls_once_spent(mode: Mode) -> None:
    rec = CallRecorder()
    gen = FakeChatModel(replies=["Paris"], recorder=rec)  # 1 prompt + 1 reply token a call
    fusor = FakeChatModel(replies=["fused"], recorder=rec)
    step = fusion_of_n(gen, n=4, fusor=fusor, max_concurrency=1, max_total_tokens=4)

    result = mode.run(step, "q?")

    assert len(rec.by_role("generator")) == 2
    assert [c.status for c in result.candidates] == ["ok", "ok", "cancelled", "cancelled"]
    assert [c.attempts for c in result.candidates] == [1, 1, 0, 0]
    assert result.candidates[2].stopped == "budget"
    assert result.candidates[2].error and result.candidates[2].error.type == "BudgetSpentError"
    # The fusor call is refused too: the vote decides, and the decision says why.
    assert rec.by_role("fusor") == []
    assert result.decision.fallback and result.decision.method == "majority_vote"
    assert result.decision.stopped == "budget" and result.decision.samples_used == 2
    assert result.decision.stop_reason and "4 of 4" in result.decision.stop_reason


def test_budget_refuses_judge_calls(mode: Mode) -> None:
    rec = CallRecorder()
    judge = FakeChatModel(replies=['{"score": 9}'], recorder=rec)
    gen = FakeChatModel(replies=["a", "b"])
    step = best_of_n(gen, n=2, selector=LLMJudge(judge), max_total_tokens=1)
    result = mode.run(step, "q?")
    assert all(c.ok for c in result.candidates)  # started before anything was spent
    assert rec.by_role("judge") == []
    assert result.decision.fallback and result.decision.stopped == "budget"


def test_budget_counts_with_the_cost_function(mode: Mode) -> None:
    rec = CallRecorder()
    gen = FakeChatModel(replies=["Paris"], recorder=rec)

    def price(usage: TokenUsage) -> float:
        return 0.5 * usage.output_tokens  # half a unit per generated token

    step = fusion_of_n(
        gen, n=4, fusor=FakeChatModel(), max_concurrency=1, max_total_tokens=1.5, cost=price
    )
    result = mode.run(step, "q?")
    assert len(rec.by_role("generator")) == 3
    assert [c.status for c in result.candidates][-1] == "cancelled"


def test_budget_of_the_subgraph_counts_what_generate_spent(mode: Mode) -> None:
    rec = CallRecorder()
    fusor = FakeChatModel(replies=["f"], recorder=rec)
    graph = create_fusion_graph(
        FakeChatModel(replies=["a"]), strategy="fusion", n=2, fusor=fusor, max_total_tokens=3
    )
    state = mode.invoke(graph.compile(), {"messages": [("user", "q?")]})
    assert rec.by_role("fusor") == []  # the two candidates spent 4 of 3
    assert state["decision"].stopped == "budget" and state["decision"].fallback


def test_usage_by_stage(mode: Mode) -> None:
    gen = FakeChatModel(replies=["one two"])
    critic = FakeChatModel(replies=["fine"])
    result = mode.run(fusion_of_n(gen, n=3, fusor=FakeChatModel(), critic=critic), "q?")
    stages = result.usage_by_stage()
    assert stages["candidates"] == TokenUsage(input_tokens=3, output_tokens=6)
    assert stages["critiques"] is not None and stages["critiques"].output_tokens == 3
    assert stages["decision"] == result.decision.usage
    assert result.usage == TokenUsage.sum(stages.values())


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"grace": -1}, ValueError, "grace must be >= 0"),
        ({"grace": "1"}, TypeError, "grace must be a number"),
        ({"max_total_tokens": 0}, ValueError, "max_total_tokens must be positive"),
        ({"cost": len}, ValueError, "pass max_total_tokens too"),
        ({"cost": 3, "max_total_tokens": 10}, TypeError, "cost must be a function"),
    ],
)
def test_bad_spending_options_fail_at_build_time(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        fusion_of_n(FakeChatModel(), n=2, fusor=FakeChatModel(), **options)


def test_a_candidate_cut_during_its_critique_keeps_its_answer(mode: Mode) -> None:
    gen = FakeChatModel(replies=["a", "b"], delays=[0, 0.05])
    # Candidate 0 is critiqued at once; candidate 1's critique is still running when the
    # grace window (0.1 s after candidate 0) ends: its answer is kept, without a critique.
    critic = FakeChatModel(replies=["fine"], delays=[0, SLOW])
    step = fusion_of_n(gen, n=2, fusor=FakeChatModel(), critic=critic, grace=0.1)
    result = mode.run(step, "q?")
    assert [c.text for c in result.candidates] == ["a", "b"]
    assert [c.status for c in result.candidates] == ["ok", "ok"]
    assert len(result.candidates[0].critiques) == 1 and result.candidates[1].critiques == []


# --- the edges (found in review) ----------------------------------------------------------------


def test_grace_counts_the_successes_of_earlier_rounds(mode: Mode) -> None:
    # Rounds of 2 (early-stopping vote that never settles); candidate 3 stalls. The quorum
    # (2) is met in round 1, so round 2's window starts at once and cuts candidate 3.
    gen = FakeChatModel(replies=["a", "b", "c", "d"], delays=[0, 0, 0, SLOW])
    vote = MajorityVote(early_stop=EarlyStop(round_size=2))
    step = best_of_n(gen, n=4, selector=vote, min_candidates=2, grace=0.05)
    result = mode.run(step, "q?")
    assert [c.status for c in result.candidates] == ["ok", "ok", "ok", "cancelled"]
    assert result.decision.stopped == "grace"


def test_early_stop_waits_for_min_candidates(mode: Mode) -> None:
    rec = CallRecorder()
    gen = FakeChatModel(replies=["4"], recorder=rec)
    step = best_of_n(gen, n=8, selector=MajorityVote(early_stop=True), min_candidates=5)
    result = mode.run(step, "q?")
    assert len(rec.by_role("generator")) == 6  # rounds of 2 until 5 succeeded, then settled
    assert sum(c.ok for c in result.candidates) == 6 and result.decision.stopped == "early_stop"


def test_a_candidate_kept_after_its_critique_was_cut_is_reported_finished(mode: Mode) -> None:
    events: list[Any] = []
    gen = FakeChatModel(replies=["a", "b"], delays=[0, 0.05])
    critic = FakeChatModel(replies=["fine"], delays=[0, SLOW])
    step = fusion_of_n(gen, n=2, fusor=FakeChatModel(), critic=critic, grace=0.1)
    if mode.sync:
        step.run("q?", on_event=events.append)
    else:
        asyncio.run(step.arun("q?", on_event=events.append))
    finished = sorted(e["index"] for e in events if e["event"] == "candidate_finished")
    assert finished == [0, 1]


def test_every_cause_is_given_and_the_vote_is_named_first(mode: Mode) -> None:
    gen = FakeChatModel(replies=["4"], delays=[0, SLOW, 0, 0, 0, 0, 0, 0])
    step = best_of_n(gen, n=8, selector=MajorityVote(early_stop=True), grace=0.05)
    result = mode.run(step, "q?")
    assert [c.stopped for c in result.candidates][1] == "grace"
    assert result.decision.stopped == "early_stop"
    reason = result.decision.stop_reason or ""
    assert "grace window" in reason and "vote settled" in reason


def test_a_retry_the_budget_refuses_keeps_the_real_error(mode: Mode) -> None:
    def reply(call: Any) -> Any:
        return RuntimeError("HTTP 500") if call.index == 0 else "b"

    gen = FakeChatModel(replies=reply, delays=[0.05, 0])
    retry = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=False, retry_on=RuntimeError)
    step = best_of_n(gen, n=2, selector=MajorityVote(), max_total_tokens=1, retry=retry)
    first = mode.run(step, "q?").candidates[0]
    assert first.status == "failed" and first.stopped is None
    assert first.error is not None and first.error.message == "HTTP 500"


def test_a_node_answering_with_a_command_is_charged() -> None:
    calls: list[int] = []
    usage = {"input_tokens": 5, "output_tokens": 5, "total_tokens": 10}

    def node(state: MessagesState) -> Command[Any]:
        calls.append(1)
        return Command(update={"messages": [AIMessage("x", usage_metadata=usage)]})

    step = best_of_n(node, n=3, selector=MajorityVote(), max_concurrency=1, max_total_tokens=1)
    builder = StateGraph(MessagesState)
    builder.add_node("agent", step)
    builder.add_edge(START, "agent")
    builder.compile().invoke({"messages": [("user", "hi")]})
    assert len(calls) == 1  # the first reply spent the budget


def test_an_interrupt_during_the_grace_window_pauses_the_graph_at_once() -> None:
    async def node(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        index = config["metadata"][INDEX_KEY]
        if index == 1:
            await asyncio.sleep(0.05)
            return {"messages": [AIMessage(f"approved {interrupt('ok?')}")]}
        if index == 2:
            await asyncio.sleep(SLOW)
        return {"messages": [AIMessage(f"plain {index}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", best_of_n(node, n=3, selector=lambda m, c: c.index, grace=SLOW))
    builder.add_edge(START, "agent")
    graph = builder.compile(checkpointer=InMemorySaver())
    config: RunnableConfig = {"configurable": {"thread_id": "t"}}

    async def main() -> dict[str, Any]:
        # Without the fix this waits out the 30 s window: bound it well below that.
        return await asyncio.wait_for(graph.ainvoke({"messages": [("user", "hi")]}, config), 10)

    assert "__interrupt__" in asyncio.run(main())


def test_threshold_one_half_is_refused() -> None:
    with pytest.raises(ValueError, match=r"threshold must be in \(0.5, 1\)"):
        EarlyStop(threshold=0.5)
