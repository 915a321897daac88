"""The proxy in front of the embedded model (``local``): a fused answer and a streamed
pass-through, with small ``max_tokens``."""

from __future__ import annotations

import pytest

from fusion_graph.serve import ServeLimits
from tests.serve.conftest import Serve

pytestmark = [pytest.mark.integration, pytest.mark.server]

QUESTION = [{"role": "user", "content": "Name a primary colour."}]


def test_the_embedded_model_answers_through_the_proxy(serve: Serve) -> None:
    proxy = serve("local", limits=ServeLimits(max_tokens=16, max_n=2, default_n=2))
    client = proxy.client()
    assert [m.id for m in client.models.list()][:2] == ["local", "SmolLM2-135M-Instruct"]
    fused = client.chat.completions.create(
        model="fusion-2/local", messages=QUESTION, max_tokens=12, seed=1
    )
    report = fused.model_extra["fusion_graph"]
    assert fused.model == "fusion-2/local"
    assert [c["status"] for c in report["candidates"]] == ["ok", "ok"]
    assert report["decision"]["fused"] or report["decision"]["fallback"]
    assert fused.usage.completion_tokens > 0
    assert fused.usage.total_tokens == sum(
        s["total_tokens"] for s in report["usage_by_stage"].values()
    )
    stream = client.chat.completions.create(
        model="local", messages=QUESTION, max_tokens=8, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.strip()
