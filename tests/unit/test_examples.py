"""Every example runs (on fake models patched in, for speed). The integration tier runs
them for real, on the embedded model, in tests/integration/test_examples_real.py."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, ToolMessage

from fusion_graph.testing import FakeCall, FakeChatModel, tool_call

EXAMPLES = Path(__file__).parents[2] / "examples"


def _reply(call: FakeCall) -> str | AIMessage:
    if call.role == "judge":
        if "Candidate B" in call.last:  # pairwise: prefer "answer 2" in either position
            a, b = call.last.split("Candidate B")
            return '{"winner": "%s"}' % (
                "A" if "answer 2" in a else "B" if "answer 2" in b else "tie"
            )
        return '{"score": 8, "rationale": "clear"}'
    results = [m for m in call.messages if isinstance(m, ToolMessage)]
    if results:
        return AIMessage(f"The result is {results[-1].content}.")
    if call.kwargs.get("tools"):
        return AIMessage("", tool_calls=[tool_call("multiply", {"a": 12.5, "b": 4})])
    return "fused answer" if call.role == "fusor" else f"answer {call.index}"


@pytest.fixture
def run_example(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import _common

    def fake_model(args: Any, **kwargs: Any) -> FakeChatModel:
        return FakeChatModel(replies=_reply, model_name=f"fake-t{kwargs.get('temperature', '')}")

    monkeypatch.setattr(_common, "chat_model", fake_model)

    def run(name: str, *argv: str) -> str:
        monkeypatch.setattr(sys, "argv", [name, *argv])
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
        return capsys.readouterr().out

    return run


def test_every_example_is_tested() -> None:
    tested = {
        "quickstart.py",
        "teacher_pool.py",
        "existing_workflow.py",
        "tool_agent.py",
        "create_agent.py",
    }
    found = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert found == tested | {"tracing.py"}


def test_quickstart(run_example: Any) -> None:
    out = run_example("quickstart.py")
    assert "FusioN over 4 candidates" in out and "fused answer" in out
    assert "BoN with an LLM judge picked candidate 0, score 8.0" in out


def test_teacher_pool(run_example: Any) -> None:
    out = run_example("teacher_pool.py", "-n", "4")
    assert "[1] fake-t0.7" in out and "[2] fake-t1.0" in out
    assert "Winner: candidate 2 (pairwise_judge:fake-t0.0)" in out


def test_existing_workflow(run_example: Any) -> None:
    out = run_example("existing_workflow.py", "-n", "3")
    assert out.count("candidate ") >= 3 and "decision: fused=True" in out
    assert "(answered by fusion) fused answer" in out
    assert "ticket answer (3 candidates): fused answer" in out


def test_tool_agent_runs_the_tool_once(run_example: Any) -> None:
    out = run_example("tool_agent.py")
    assert "tool calls executed: ['multiply(12.5, 4.0)']" in out
    assert "The result is 50.0." in out


def test_tracing_sends_one_trace(
    run_example: Any, otlp_receiver: tuple[str, list[tuple[str, bytes]]]
) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    url, received = otlp_receiver
    out = run_example("tracing.py", "--endpoint", url, "-n", "3")
    assert "fused answer" in out
    spans = [
        span
        for _, body in received
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans
        for scope in rs.scope_spans
        for span in scope.spans
    ]
    trace_id = out.split()[1]
    assert {s.trace_id.hex() for s in spans} == {trace_id}
    names = [s.name for s in spans]
    assert names.count("chat fake-t") == 3 and "my-app-request" in names


def test_create_agent_runs_the_fused_tool_call_once(run_example: Any) -> None:
    out = run_example("create_agent.py", "-n", "3")
    assert "last step: 3 candidates, fusion:" in out
    assert "tool calls executed: ['multiply(12.5, 4.0)']" in out
    assert "The result is 50.0." in out
