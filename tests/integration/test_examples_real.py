"""Each example runs as documented: a subprocess on the real embedded model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("quickstart.py", ["FusioN over 2 candidates", "BoN with an LLM judge picked candidate"]),
        ("teacher_pool.py", ["[2] SmolLM2-135M-Instruct", "Winner: candidate"]),
        ("existing_workflow.py", ["decision: fused=True", "ticket answer (2 candidates)"]),
        ("tool_agent.py", ["tool calls executed:"]),  # bind_tools: a JSON grammar
        ("create_agent.py", ["last step: 2 candidates, fusion:", "tool calls executed:"]),
    ],
)
def test_example_runs_on_the_embedded_model(script: str, expected: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "-n", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stdout, proc.stdout


def test_tracing_example_on_the_embedded_model(
    otlp_receiver: tuple[str, list[tuple[str, bytes]]],
) -> None:
    url, received = otlp_receiver
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "tracing.py"), "-n", "2", "--endpoint", url],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("trace ") and received
