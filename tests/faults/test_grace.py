"""The straggler cut-off against a real HTTP server: a cut candidate's request is closed
(async path), and `fusion-graph synth --grace` writes the row without the stalled teacher."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fusion_graph import fusion_of_n
from fusion_graph.cli import app
from fusion_graph.integrations.openai_compat import openai_compatible
from fusion_graph.testing import FakeChatModel
from tests.faults.fake_openai import FakeOpenAI, Fault, Request, odd_seed

pytestmark = pytest.mark.faults

STALL = 30.0  # the stragglers' first byte: far beyond any test's time


def test_cut_candidates_close_their_requests(fake_openai: FakeOpenAI) -> None:
    fake_openai.configure(honour_n=True, rules=[(odd_seed, Fault.slow_first_byte(STALL))])
    llm = openai_compatible(fake_openai.base_url, "fake", max_retries=0, timeout=60)
    step = fusion_of_n([llm] * 4, n=4, fusor=FakeChatModel(), seed=0, grace=0.2)

    result = asyncio.run(step.arun("q?"))

    assert [c.status for c in result.candidates] == ["ok", "cancelled", "ok", "cancelled"]
    assert result.decision.stopped == "grace"
    # The two stalled requests were closed by the client (the server saw them go), not left
    # waiting for their first byte.
    assert fake_openai.wait_idle(2.0), f"{fake_openai.in_flight} request(s) still in flight"
    assert sorted(fake_openai.outcomes) == ["abandoned", "abandoned", "ok", "ok"]


def _slow_teacher(request: Request) -> bool:
    return request.body.get("model") == "slow"


def test_synth_grace_writes_the_row_without_the_stalled_teacher(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.configure(honour_n=True, rules=[(_slow_teacher, Fault.slow_first_byte(STALL))])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Capital of France?"}) + "\n")
    out = tmp_path / "out.jsonl"
    url = fake_openai.base_url
    args = [
        "synth", str(prompts), "-o", str(out), "-t", f"openai:{url}:fast",
        "-t", f"openai:{url}:slow", "--selector", "vote", "--fusor", f"openai:{url}:fusor",
        "--grace", "0.2", "--retries", "0",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["fast"] and row["slow"] is None
    assert "grace window" in row["failed_teachers"]["slow"]
    assert row["BoN_teacher"] == "fast" and row["Fusion"]
    assert fake_openai.wait_idle(2.0), "the stalled teacher's request was left in flight"
