"""A LangChain v1 agent (``create_agent``) with two tools whose every model step is fused:
``FusionMiddleware`` makes N candidate calls through the agent's own model step, a fusor
(bound to the same tools) writes one answer, and the agent runs the tools once, for that
answer only. The candidates and the decision come back in the state.

    pip install 'fusion-graph[agents,local]'
    python examples/create_agent.py --base-url http://127.0.0.1:8000/v1 --model NAME
    python examples/create_agent.py      # embedded model (see below)

The embedded model calls tools through a JSON grammar (every call is well-formed), but
small models pick the right tool and arguments only sometimes (SmolLM2-135M: about 2 right
calls in 18; the 1.5B default is not measured on tools), so use a bigger model for a real
agent.
"""

from __future__ import annotations

from _common import chat_model, parser
from langchain.agents import create_agent
from langchain.agents.middleware import ModelCallLimitMiddleware
from langchain_core.tools import tool

from fusion_graph.middleware import FusionMiddleware

CALLS: list[str] = []


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    CALLS.append(f"multiply({a}, {b})")
    return a * b


@tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    CALLS.append(f"add({a}, {b})")
    return a + b


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__ or "").parse_args(argv)
    llm = chat_model(args, max_tokens=64)
    agent = create_agent(
        llm,
        [multiply, add],
        system_prompt="Use the tools for arithmetic, then answer in one sentence.",
        # At most 3 model steps (a fused step counts as one): a weak model that keeps
        # calling tools ends there instead of looping. A fixed seed makes runs repeatable.
        middleware=[
            ModelCallLimitMiddleware(run_limit=3, exit_behavior="end"),
            FusionMiddleware(n=args.n, fusor=llm, seed=0),
        ],
    )
    out = agent.invoke({"messages": [("user", "What is 12.5 times 4? Use the multiply tool.")]})
    decision = out["fusion_decision"]
    print(f"last step: {len(out['fusion_candidates'])} candidates, {decision.method}")
    print(f"tool calls executed: {CALLS or 'none'}")
    print(out["messages"][-1].text or "(no text answer)")


if __name__ == "__main__":
    main()
