"""The ``fusion_graph`` extension field of a response: what ran, the usage of each stage,
each candidate's status and latency, and the decision. Clients that do not know it ignore
it; the response's ``usage`` is the sum of its stages (:attr:`FusionResult.usage`)."""

from __future__ import annotations

from typing import Any

from fusion_graph.serve.openai_format import usage_body
from fusion_graph.serve.strategy import StrategyChoice
from fusion_graph.types import FusionResult, TokenUsage


def pass_through_report(choice: StrategyChoice, usage: TokenUsage | None) -> dict[str, Any]:
    """The extension of a pass-through: one upstream call."""
    return {"strategy": "pass_through", "n": 1, "usage_by_stage": {"upstream": usage_body(usage)}}


def run_report(choice: StrategyChoice, result: FusionResult) -> dict[str, Any]:
    """The extension of a fused or selected answer."""
    candidates = result.candidates
    critiques = [k.usage for c in candidates for k in c.critiques]
    stages = {
        "candidates": usage_body(TokenUsage.sum(c.usage for c in candidates)),
        "critiques": usage_body(TokenUsage.sum(critiques)),
        "decision": usage_body(result.decision.usage),
    }
    decision = result.decision
    return {
        "strategy": choice.kind,
        "n": choice.n,
        "selector": choice.selector,
        "critic": choice.critic,
        "usage_by_stage": stages,
        "candidates": [
            {
                "index": c.index,
                "model": c.model,
                "status": "ok" if c.ok else "failed",
                "latency_s": round(c.latency_s, 4),
                "attempts": c.attempts,
                "usage": usage_body(c.usage),
                "error": c.error.model_dump() if c.error is not None else None,
            }
            for c in candidates
        ],
        "decision": {
            "method": decision.method,
            "fused": decision.fused,
            "selected_index": decision.selected_index,
            "score": decision.score,
            "fallback": decision.fallback,
            "fallback_reason": decision.fallback_reason,
            "latency_s": round(decision.latency_s, 4),
        },
    }
