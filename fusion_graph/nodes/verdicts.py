"""How a judge's verdict is asked for and read: a JSON schema the backend enforces, and a
score read from the judge's token probabilities rather than from the one digit it sampled.

Schema-constrained verdicts
    On backends that take an OpenAI-style ``response_format`` with a JSON schema (the
    embedded model, through llama.cpp's grammar; any ``langchain_openai`` chat model: OpenAI,
    vLLM's guided decoding, llama.cpp's server) a verdict is decoded under the schema, so an
    unparseable verdict cannot happen. Other chat models get the same prompt and their text
    is parsed.

Probability-weighted scores (G-Eval)
    A sampled score is one draw: small judges give most answers the same digit, so scores
    tie and rank nothing. Where the reply carries ``logprobs`` with the top alternatives at
    each token, :func:`expected_score` returns the expectation of the score under the
    judge's distribution at the score's first token (G-Eval, Liu et al. 2023): continuous,
    so ties break and a confident 7 ranks above a hesitant one. ``docs/eval.md`` measures
    both on the built-in set.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable

from fusion_graph.runtime import inner_model

__all__ = [
    "JUDGE_MAX_TOKENS",
    "JUDGE_SCHEMA",
    "PAIRWISE_SCHEMA",
    "TOP_LOGPROBS",
    "constrained_options",
    "expected_score",
    "reports_logprobs",
    "takes_json_schema",
]

JUDGE_MAX_TOKENS = 48
"""New tokens for a verdict made by a command (``ask``, ``eval``, ``synth``): the score (the
schema's first field) and a one-sentence rationale."""

TOP_LOGPROBS = 10
"""Alternatives asked for at each token: enough to hold every score digit."""

JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "enum": list(range(1, 11))},
        "rationale": {"type": "string"},
    },
    "required": ["score", "rationale"],
    "additionalProperties": False,
}
"""A pointwise verdict: the score first (so a reply cut short still has it)."""

PAIRWISE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": ["A", "B", "tie"]},
        "rationale": {"type": "string"},
    },
    "required": ["winner", "rationale"],
    "additionalProperties": False,
}


def takes_json_schema(model: Runnable[Any, Any]) -> bool:
    """Whether ``model`` enforces an OpenAI-style ``response_format`` JSON schema: it says so
    (a ``takes_json_schema`` attribute, as the embedded model has), or it is a
    ``langchain_openai`` chat model."""
    inner = inner_model(model)
    declared = getattr(inner, "takes_json_schema", None)
    if isinstance(declared, bool):
        return declared
    return any(cls.__module__.startswith("langchain_openai") for cls in type(inner).__mro__)


def reports_logprobs(model: Runnable[Any, Any]) -> bool:
    """Whether ``model`` returns OpenAI-format ``logprobs`` when asked (``logprobs=True``)."""
    return takes_json_schema(model)


def constrained_options(
    model: Runnable[Any, Any], schema: Mapping[str, Any], *, name: str, logprobs: bool
) -> dict[str, Any]:
    """The call options that make ``model`` answer in ``schema`` (and report logprobs), or
    none for a model that takes neither."""
    if not takes_json_schema(model):
        return {}
    options: dict[str, Any] = {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": dict(schema), "strict": True},
        }
    }
    if logprobs and reports_logprobs(model):
        options.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
    return options


_SCORE_KEY = re.compile(r'"score"\s*:\s*$')


def expected_score(reply: object) -> float | None:
    """The score's expectation under the judge's distribution, from the reply's logprobs at
    the first token of the ``"score"`` value; None without logprobs there.

    Digits are single tokens in most tokenizers, so "10" may start with the token "1": when
    the reply took "1", the mass of "1" is split between 1 and 10 by the probability that
    "0" followed it.
    """
    if not isinstance(reply, BaseMessage):
        return None
    logprobs = reply.response_metadata.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    if not isinstance(content, list):
        return None
    text = ""
    for i, entry in enumerate(content):
        token = str(entry.get("token", ""))
        if _SCORE_KEY.search(text) and token.strip()[:1].isdigit():
            mass = _score_mass(entry.get("top_logprobs") or [])
            if token.strip() == "1" and i + 1 < len(content) and 1 in mass:
                after = _score_mass(content[i + 1].get("top_logprobs") or [], digits=True)
                p_zero = after.get(0, 0.0)
                mass[10] = mass.get(10, 0.0) + mass[1] * p_zero
                mass[1] *= 1 - p_zero
            total = sum(mass.values())
            if total <= 0:
                return None
            return sum(score * p for score, p in mass.items()) / total
        text += token
    return None


def _score_mass(alternatives: list[Any], *, digits: bool = False) -> dict[int, float]:
    """Probability per score (1-10; with ``digits``, per digit 0-9) among a token's
    alternatives."""
    mass: dict[int, float] = {}
    low, high = (0, 9) if digits else (1, 10)
    for alt in alternatives:
        word = str(alt.get("token", "")).strip()
        logprob = alt.get("logprob")
        if word.isdigit() and low <= int(word) <= high and isinstance(logprob, int | float):
            mass[int(word)] = mass.get(int(word), 0.0) + math.exp(logprob)
    return mass
