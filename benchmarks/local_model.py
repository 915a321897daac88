"""N candidates from the embedded local model: one ``invoke`` after another vs. ``sample_n``.

Run from the repository root::

    python -m benchmarks.local_model                      # N = 1, 4, 8; 64 tokens each
    python -m benchmarks.local_model --sizes 1,2 --max-tokens 8 --repeats 1   # smoke run

Both modes use the same model, prompt, temperature and seeds. Sequential calls already reuse
the prompt's KV cache between calls (llama-cpp-python keeps the longest common prefix), so the
gain of batching comes from decoding N sequences per ``llama_decode`` call.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from fusion_graph.integrations.llama_cpp import ChatLocalModel

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from langchain_core.messages import AIMessage

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
TEMPERATURE = 0.8
FIRST_SEED = 1000

Row = dict[str, float]


def _output_tokens(replies: Sequence[AIMessage | Exception]) -> int:
    total = 0
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        if reply.usage_metadata is not None:
            total += reply.usage_metadata["output_tokens"]
    return total


def _timed(
    calls: Sequence[Callable[[], list[AIMessage | Exception]]], repeats: int
) -> list[tuple[float, int]]:
    """Best wall time and output tokens of each call over ``repeats`` rounds.

    The calls alternate within a round, so a burst of load from other processes hits them
    alike; with fixed seeds every run of a call makes the same tokens.
    """
    best = [float("inf")] * len(calls)
    tokens = [0] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            replies = call()
            best[i] = min(best[i], time.perf_counter() - start)
            tokens[i] = _output_tokens(replies)
    return list(zip(best, tokens, strict=True))


def run(
    sizes: Sequence[int] = (1, 4, 8),
    max_tokens: int = 64,
    repeats: int = 1,
    n_threads: int | None = None,
) -> list[Row]:
    """Time ``n`` candidates per size, sequentially and batched; one row per size.

    Each timing is the best of ``repeats`` runs, which filters out other processes' load.
    ``n_threads`` is passed to :class:`ChatLocalModel` (None: every core).
    """
    model = ChatLocalModel(max_tokens=max_tokens, temperature=TEMPERATURE, n_threads=n_threads)
    # Warm up: load the model, page in its weights, allocate the batched context.
    model.invoke(PROMPT, max_tokens=2)
    model.sample_n(PROMPT, seeds=list(range(max(sizes))), max_tokens=2)

    def one() -> list[AIMessage | Exception]:
        return [model.invoke(PROMPT, seed=FIRST_SEED)]

    ((one_s, one_tokens),) = _timed([one], repeats)

    rows: list[Row] = []
    for n in sizes:
        seeds = [FIRST_SEED + i for i in range(n)]

        def sequential(seeds: list[int] = seeds) -> list[AIMessage | Exception]:
            return [model.invoke(PROMPT, seed=seed) for seed in seeds]

        def batched(seeds: list[int] = seeds) -> list[AIMessage | Exception]:
            return model.sample_n(PROMPT, seeds=seeds)

        (sequential_s, sequential_tokens), (batched_s, batched_tokens) = _timed(
            [sequential, batched], repeats
        )
        rows.append(
            {
                "n": n,
                "max_tokens": max_tokens,
                "repeats": repeats,
                "n_threads": n_threads or 0,
                "sequential_s": sequential_s,
                "sequential_tokens": sequential_tokens,
                "sequential_tok_s": sequential_tokens / sequential_s,
                "batched_s": batched_s,
                "batched_tokens": batched_tokens,
                "batched_tok_s": batched_tokens / batched_s,
                "batched_over_sequential": batched_s / sequential_s,
            }
        )
    # N=1 sequential is the same call as the one-candidate baseline: keep the best of both.
    one_s = min([one_s] + [r["sequential_s"] for r in rows if r["n"] == 1])
    for row in rows:
        row["one_s"] = one_s
        row["one_tokens"] = one_tokens
        row["sequential_over_one"] = row["sequential_s"] / one_s
        row["batched_over_one"] = row["batched_s"] / one_s
    return rows


def to_markdown(rows: Sequence[Row]) -> str:
    """The rows of :func:`run` as a markdown table."""
    header = (
        "| N | sequential s | seq. tokens | seq. tok/s | batched s | batched tokens "
        "| batched tok/s | batched / sequential | sequential / one | batched / one |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['n']:.0f} | {r['sequential_s']:.2f} | {r['sequential_tokens']:.0f} "
        f"| {r['sequential_tok_s']:.0f} | {r['batched_s']:.2f} | {r['batched_tokens']:.0f} "
        f"| {r['batched_tok_s']:.0f} | {r['batched_over_sequential']:.2f} "
        f"| {r['sequential_over_one']:.2f} | {r['batched_over_one']:.2f} |"
        for r in rows
    ]
    footer = ""
    if rows:
        r = rows[0]
        footer = (
            f"\n\nmax_tokens={r['max_tokens']:.0f}; best of {r['repeats']:.0f} runs; "
            f"threads: {r['n_threads'] or 'every core'}; "
            "one candidate (a single invoke): "
            f"{r['one_s']:.2f} s, {r['one_tokens']:.0f} tokens."
        )
    return header + "\n".join(lines) + footer


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        msg = f"--sizes takes positive integers separated by commas, like 1,4,8; got {text!r}."
        raise argparse.ArgumentTypeError(msg)
    return sizes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=_sizes, default=[1, 4, 8], help="e.g. 1,4,8")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per candidate")
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1.")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1.")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1.")
    print(to_markdown(run(args.sizes, args.max_tokens, args.repeats, args.threads)))


if __name__ == "__main__":
    main()
