"""``fusion-graph serve``: Best-of-N and Fusion-of-N behind an OpenAI-compatible API.

:func:`create_app` makes the ASGI app (FastAPI) for one upstream; mount it in your own
server or run it with ``fusion-graph serve --upstream SPEC``. The strategy of each request
comes from its model name (``fusion-4/MODEL``, ``bon-8-judge/MODEL``, ``vote-5/MODEL``; a
plain ``MODEL`` passes through: to an ``openai:`` / ``vllm:`` upstream as raw HTTP, see
:mod:`fusion_graph.serve.forward`) or its ``fusion_graph`` object: see
:mod:`fusion_graph.serve.strategy`.

Install with ``pip install 'fusion-graph[serve]'`` (FastAPI and uvicorn).
"""

from fusion_graph.serve.app import create_app
from fusion_graph.serve.limits import ServeLimits
from fusion_graph.serve.strategy import StrategyChoice, StrategyError, parse_model_name
from fusion_graph.serve.upstream import Upstream

__all__ = [
    "ServeLimits",
    "StrategyChoice",
    "StrategyError",
    "Upstream",
    "create_app",
    "parse_model_name",
]
