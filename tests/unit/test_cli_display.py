"""The ``ask`` progress display: words for fallbacks (never swallowed as markup), a clock
that ticks, plain lines when stderr is not a terminal, and what Ctrl-C leaves behind."""

from __future__ import annotations

import io
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from rich.console import Console

from fusion_graph.cli import progress
from fusion_graph.cli.progress import RunDisplay, describe_decision
from fusion_graph.events import DecisionMade, candidate_finished, candidate_started
from fusion_graph.types import Candidate, ErrorInfo


def console(*, terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=200, color_system=None), out


FALLBACK: DecisionMade = {
    "event": "decision",
    "strategy": "best_of_n",
    "fused": False,
    "selected_index": 1,
    "score": 0.5,
    "method": "majority_vote",
    "fallback": True,
    "fallback_reason": "llm_judge:m failed: SelectorOutputError: [no] valid score",
    "latency_s": 0.1,
}


def test_a_fallback_is_said_in_words_and_its_brackets_survive() -> None:
    text = describe_decision(FALLBACK)
    assert text.startswith("fell back to majority_vote: llm_judge:m failed")
    shown, out = console(terminal=True)
    display = RunDisplay(2, shown)
    display.on_event(FALLBACK)
    shown.print(display)
    text = " ".join(out.getvalue().split())  # the caption wraps at the table's width
    assert "fell back to majority_vote" in text
    assert "[no] valid score" in text  # escaped, not eaten as markup


def test_plain_lines_when_stderr_is_not_a_terminal() -> None:
    shown, out = console(terminal=False)
    failed = Candidate(index=1, model="m", error=ErrorInfo(type="TimeoutError", message="slow"))
    with RunDisplay(2, shown) as display:
        display.on_event(candidate_started(0, "m"))
        display.on_event(candidate_started(1, "m"))
        display.on_event(candidate_finished(failed))
        display.on_event(FALLBACK)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("2 candidates")
    assert any(line.endswith("candidate 0 (m) started") for line in lines)
    assert any("candidate 1 finished in 0.00 s: failed, TimeoutError: slow" in ln for ln in lines)
    assert any("fell back to majority_vote" in line for line in lines)
    assert lines[-1].endswith("2 candidates done (0 ok)")


def test_the_clock_ticks_while_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    now = {"t": 100.0}
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now["t"])
    shown, out = console(terminal=True)
    display = RunDisplay(3, shown)
    shown.print(display)
    now["t"] += 42.0
    shown.print(display)
    assert "3 candidates, 0.0 s" in out.getvalue() and "3 candidates, 42.0 s" in out.getvalue()


def test_streamed_tokens_show_under_the_table() -> None:
    from langchain_core.messages import AIMessageChunk

    shown, out = console(terminal=True)
    display = RunDisplay(1, shown)
    for word in ["Par", "is."]:
        display.on_token(AIMessageChunk(content=word))
    shown.print(display)
    assert "Paris." in out.getvalue()


def test_an_interrupt_marks_running_candidates_cancelled() -> None:
    shown, out = console(terminal=True)
    display = RunDisplay(3, shown)
    display.on_event(candidate_started(0, "m"))
    display.on_event(candidate_started(1, "m"))
    done = Candidate(index=0, model="m", message=None, error=None)
    display.on_event(candidate_finished(done.model_copy(update={"error": None})))
    summary = display.interrupted()
    shown.print(display)
    assert summary == "1 of 3 candidates had finished; nothing was decided"
    assert "cancelled" in out.getvalue() and "interrupted" in out.getvalue()


def test_the_panel_of_show_candidates_holds_the_critiques() -> None:
    from fusion_graph.cli.ask import _candidate_panel
    from fusion_graph.types import Critique

    message = AIMessage(content="Paris [capital]")
    candidate = Candidate(index=0, model="m", message=message, text="Paris [capital]")
    candidate.critiques.append(Critique(model="critic", text="Right. Score: 9/10", score=9))
    shown, out = console(terminal=True)
    shown.print(_candidate_panel(candidate))
    text: Any = out.getvalue()
    assert "Paris [capital]" in text and "critique 9/10 (critic):" in text and "Right." in text
