"""Quickstart: wrap a chat model with Fusion-of-N and with Best-of-N, print both.

    python examples/quickstart.py                      # embedded local model, offline
    python examples/quickstart.py --base-url http://127.0.0.1:8000/v1 --model NAME

The wrapped model keeps the chat model's contract (str | messages -> AIMessage); ``.run``
also returns every candidate and the decision.
"""

from __future__ import annotations

from _common import chat_model, parser

from fusion_graph import LLMJudge, best_of_n, fusion_of_n

QUESTION = "In one sentence: why do we have seasons on Earth?"


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__ or "").parse_args(argv)
    llm = chat_model(args)

    fused = fusion_of_n(llm, n=args.n, fusor=llm)
    result = fused.run(QUESTION)
    print(f"FusioN over {args.n} candidates ({result.decision.method}):")
    print(f"  {result.message.text}\n")

    best = best_of_n(llm, n=args.n, selector=LLMJudge(llm))
    result = best.run(QUESTION)
    d = result.decision
    how = f"candidate {d.selected_index}, score {d.score}" + (" (fallback)" if d.fallback else "")
    print(f"BoN with an LLM judge picked {how} ({d.method}):")
    print(f"  {result.message.text}")


if __name__ == "__main__":
    main()
