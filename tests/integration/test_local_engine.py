"""fusion-graph end to end on the real embedded model (no fakes): batched candidates,
FusioN, BoN, a judge that answers garbage, and a LangGraph Send fan-out that must not
crash the shared llama.cpp model."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fusion_graph import LLMJudge, MajorityVote, PromptTemplate, best_of_n, fusion_of_n
from fusion_graph.integrations.llama_cpp import ChatLocalModel

pytestmark = pytest.mark.integration

QUESTION = "Name one primary colour."


@pytest.fixture(scope="module")
def llm() -> ChatLocalModel:
    return ChatLocalModel(max_tokens=24, temperature=0.9)


def test_fusion_end_to_end_with_batched_candidates(llm: ChatLocalModel) -> None:
    result = fusion_of_n(llm, n=3, fusor=llm, seed=5).run(QUESTION)
    assert result.decision.fused and result.message.text.strip()
    assert [c.seed for c in result.candidates] == [5, 6, 7]
    assert all(c.ok and c.usage and c.usage.output_tokens > 0 for c in result.candidates)
    # The three candidates came from ONE batched llama.cpp pass: the prompt was decoded
    # once for all of them.
    metas = [c.message.response_metadata for c in result.candidates if c.message]
    assert all(m["batched"] and m["batch_size"] == 3 for m in metas)
    assert {m["prompt_eval_tokens"] for m in metas} == {result.candidates[0].usage.input_tokens}
    assert len({c.text for c in result.candidates}) >= 2  # distinct seeds, distinct samples


async def test_best_of_n_majority_vote_async(llm: ChatLocalModel) -> None:
    result = await best_of_n(llm, n=3, selector=MajorityVote(), seed=1).arun(QUESTION)
    chosen = result.decision.selected_index
    assert chosen is not None and result.message.text == result.candidates[chosen].text
    assert result.decision.method == "majority_vote" and not result.decision.fallback


def test_judge_that_answers_garbage_falls_back(llm: ChatLocalModel) -> None:
    """Asked for a candidate index instead of a score (the question that made this model
    answer ``{"best": 2017}``), the judge's replies hold no valid 1-10 score: the run says
    so and the fallback selector decides."""
    index_prompt = PromptTemplate(
        name="judge-index",
        version="test",
        system='Reply with JSON only: {"best": <the year this reply was written>}.',
        user="Conversation:\n{conversation}\n\nReply:\n{candidate}",
    )
    # Unconstrained: under the verdict's JSON schema (the default on this model) every reply
    # holds a valid score, whatever the prompt asks for.
    judge = LLMJudge(llm.bind(temperature=0.0), prompt=index_prompt, constrained=False)
    result = best_of_n(llm, n=2, selector=judge, seed=3).run(QUESTION)
    decision = result.decision
    assert decision.fallback and decision.method == "majority_vote"
    assert decision.fallback_reason is not None
    assert "no valid 1-10 score" in decision.fallback_reason
    assert result.message.text == result.candidates[decision.selected_index or 0].text


def test_langgraph_send_fan_out_over_the_shared_model_does_not_crash() -> None:
    """Four LangGraph Send tasks call one model from four threads at once: the pattern that
    segfaults a bare llama.cpp model. Run in a subprocess so a crash is an exit code."""
    script = textwrap.dedent(
        """
        import operator
        from typing import Annotated, TypedDict
        from langgraph.graph import END, START, StateGraph
        from langgraph.types import Send
        from fusion_graph.integrations.llama_cpp import ChatLocalModel

        llm = ChatLocalModel(max_tokens=12)

        class State(TypedDict):
            answers: Annotated[list[str], operator.add]

        def fan_out(state: State) -> list[Send]:
            return [Send("ask", {"answers": [], "i": i}) for i in range(4)]

        def ask(state: dict) -> dict:
            return {"answers": [llm.invoke(f"Say a word about {state['i']}", seed=state["i"]).text]}

        g = StateGraph(State)
        g.add_node("ask", ask)
        g.add_conditional_edges(START, fan_out, ["ask"])
        g.add_edge("ask", END)
        out = g.compile().invoke({"answers": []}, {"max_concurrency": 4})
        assert len(out["answers"]) == 4 and all(a.strip() for a in out["answers"]), out
        print("ok", len(out["answers"]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "ok 4"
