"""Shared by the examples: pick the model from the command line.

With no options the examples run the embedded local model (Qwen2.5-Coder-1.5B-Instruct on
llama.cpp, CPU only, no network; ``FUSION_GRAPH_LOCAL_MODEL=smollm2-135m`` for the fast
one). ``--base-url URL --model NAME`` uses any OpenAI-compatible server instead (vLLM,
llama.cpp server, hosted APIs); its key is read from ``--api-key-env`` (default
``OPENAI_API_KEY``).
"""

from __future__ import annotations

import argparse
import os

from langchain_core.language_models import BaseChatModel

from fusion_graph.models import ModelSpec, build_model


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the model options every example takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--base-url", default=os.environ.get("FUSION_GRAPH_BASE_URL"))
    p.add_argument("--model", default=os.environ.get("FUSION_GRAPH_MODEL"))
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("-n", type=int, default=4, help="candidates per step")
    return p


def chat_model(
    args: argparse.Namespace, *, temperature: float = 0.7, max_tokens: int = 128
) -> BaseChatModel:
    """The embedded local model, or the OpenAI-compatible model named on the command line."""
    spec = (
        ModelSpec.parse(f"openai:{args.base_url}:{args.model or 'default'}")
        if args.base_url
        else ModelSpec.parse("local")
    )
    return build_model(
        spec, temperature=temperature, max_tokens=max_tokens, api_key_env=args.api_key_env
    )
