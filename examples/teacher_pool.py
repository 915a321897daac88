"""A pool of teachers: candidate i comes from model i mod len(pool), here one model at
three temperatures (or several endpoints), and a pairwise judge picks the best in a
knockout tournament, each pair judged in both orders.

    python examples/teacher_pool.py
    python examples/teacher_pool.py --base-url http://127.0.0.1:8000/v1 --model NAME
"""

from __future__ import annotations

from _common import chat_model, parser

from fusion_graph import PairwiseJudge, best_of_n

QUESTION = "Give one tip for writing clear emails."


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__ or "").parse_args(argv)
    pool = [chat_model(args, temperature=t) for t in (0.3, 0.7, 1.0)]
    judge = chat_model(args, temperature=0.0, max_tokens=48)
    best = best_of_n(pool, n=max(args.n, 3), selector=PairwiseJudge(judge))
    result = best.run(QUESTION)
    decision = result.decision
    # The tournament scores matches won; a fallback vote scores each answer's vote share.
    unit = "matches won" if decision.method.startswith("pairwise") else "vote share"
    for c in result.candidates:
        score = decision.scores.get(c.index, 0)
        status = c.text.replace("\n", " ")[:70] if c.ok else f"failed: {c.error}"
        print(f"[{c.index}] {c.model} (seed {c.seed}, {unit} {score:g}): {status}")
    print(f"\nWinner: candidate {decision.selected_index} ({decision.method})")
    if decision.fallback:
        print(f"(the judge failed, so a vote decided: {decision.fallback_reason})")
    print(result.message.text)


if __name__ == "__main__":
    main()
