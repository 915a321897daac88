"""Compare the packaged embedded models (docs/models.md): answer accuracy and loops on the
built-in eval set, judge verdicts on right-vs-wrong answers, speed, memory and the wall time
of `fusion-graph ask --n 4`.

Each model runs in a process of its own (so its peak RSS is its own), one after another:

    .venv/bin/python scripts/compare_models.py --out docs/models.json
    .venv/bin/python scripts/compare_models.py --models smollm2-135m --items 10   # quick look

Per model, on the first ``--items`` items of the built-in set (seed ``--seed + i`` for item i):
* ``accuracy``: one reply per item with the default decoding (temperature 0.7, repetition
  penalty 1.1, the repeat guard), right when a reference appears in it (the eval's
  ``contains`` matcher);
* ``loops``: replies in which a sentence of 3+ words occurs 3 or more times, with the
  default decoding and raw (no penalty, no guard), on the first ``--loop-items`` items;
* ``judge``: the default pointwise judge (JSON-schema-constrained, temperature 0) scores a
  right answer (the item's reference) and a wrong one (another item's reference from the
  same category) for the first ``--judge-items`` items: valid verdicts, and how often the
  right answer scores higher, with the sampled score and the probability-weighted one;
* ``tok/s``: generated tokens over the wall time of the accuracy replies;
* ``ask_s``: wall time of `fusion-graph ask --n 4` on the demo question (a fresh process,
  model load included).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
DEMO_QUESTION = "What is the capital of France, and what is it famous for?"


def _wrong_answers(items: list[Any]) -> list[str]:
    """For each item, the first reference of the next item in its category (cyclically)."""
    by_category: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_category.setdefault(str(item.extra.get("category")), []).append(i)
    wrong = [""] * len(items)
    for members in by_category.values():
        for k, i in enumerate(members):
            other = items[members[(k + 1) % len(members)]]
            wrong[i] = other.references[0]
    return wrong


def measure(key: str, args: argparse.Namespace) -> dict[str, Any]:
    from langchain_core.messages import HumanMessage

    from fusion_graph.batch.data import builtin_eval_set, read_prompts
    from fusion_graph.batch.metrics import contains_answer
    from fusion_graph.integrations.llama_cpp import ChatLocalModel
    from fusion_graph.integrations.repeat_guard import repeated_sentences
    from fusion_graph.nodes.judges import parse_judge_output
    from fusion_graph.nodes.verdicts import JUDGE_SCHEMA, constrained_options, expected_score
    from fusion_graph.prompts import JUDGE_PROMPT, build_review_messages
    from fusion_graph.types import Candidate

    items = list(read_prompts(builtin_eval_set()).items)
    started = time.perf_counter()
    model = ChatLocalModel(model=key, temperature=0.7, max_tokens=args.max_tokens)
    model.invoke("Hi", max_tokens=1)
    load_s = time.perf_counter() - started
    raw = model.model_copy(update={"repeat_penalty": 1.0, "stop_repeats": False})

    def looped(text: str) -> bool:
        return any(count >= 3 for count in repeated_sentences(text).values())

    right = 0
    loops = {"default": 0, "raw": 0}
    out_tokens, gen_s = 0, 0.0
    answers = []
    for i, item in enumerate(items[: args.items]):
        t0 = time.perf_counter()
        reply = model.invoke([HumanMessage(item.prompt)], seed=args.seed + i)
        gen_s += time.perf_counter() - t0
        out_tokens += reply.usage_metadata["output_tokens"] if reply.usage_metadata else 0
        ok = contains_answer(str(reply.content), item.references)
        right += ok
        answers.append({"id": item.id, "ok": ok, "reply": str(reply.content)})
        if i < args.loop_items:
            loops["default"] += looped(str(reply.content))
            raw_reply = raw.invoke([HumanMessage(item.prompt)], seed=args.seed + i)
            loops["raw"] += looped(str(raw_reply.content))
        print(f"{key} {i + 1}/{args.items} {'ok ' if ok else 'bad'}", file=sys.stderr)

    judge = model.model_copy(update={"temperature": 0.0, "max_tokens": 64})
    options = constrained_options(judge, JUDGE_SCHEMA, name="verdict", logprobs=True)
    wrong = _wrong_answers(items)
    valid, asked = 0, 0
    better = {"sampled": 0.0, "expected": 0.0}
    pairs = 0
    for i, item in enumerate(items[: args.judge_items]):
        scores: dict[str, dict[str, float | None]] = {}
        for label, text in (("right", item.references[0]), ("wrong", wrong[i])):
            messages = build_review_messages(
                JUDGE_PROMPT,
                [HumanMessage(item.prompt)],
                Candidate(index=0, model="answer", text=text),
            )
            reply = judge.invoke(messages, **options)
            asked += 1
            sampled, _ = parse_judge_output(str(reply.content))
            valid += sampled is not None
            scores[label] = {"sampled": sampled, "expected": expected_score(reply)}
        pairs += 1
        for how in better:
            a, b = scores["right"][how], scores["wrong"][how]
            if a is not None and b is not None:
                better[how] += 1.0 if a > b else 0.5 if a == b else 0.0
        print(f"{key} judge {i + 1}/{args.judge_items} {scores}", file=sys.stderr)

    return {
        "model": key,
        "display_name": model.model_name,
        "items": args.items,
        "accuracy": right / args.items,
        "loops_default": loops["default"],
        "loops_raw": loops["raw"],
        "loop_items": args.loop_items,
        "tokens_per_s": out_tokens / gen_s if gen_s else None,
        "load_s": load_s,
        "judge_valid": valid / asked if asked else None,
        "judge_right_above_wrong": {k: v / pairs for k, v in better.items()} if pairs else None,
        "judge_pairs": pairs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "answers": answers,
    }


def ask_seconds(key: str) -> float:
    binary = Path(sys.executable).with_name("fusion-graph")
    started = time.perf_counter()
    subprocess.run(
        [str(binary), "ask", "--n", "4", "--model", key, DEMO_QUESTION],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--items", type=int, default=110)
    parser.add_argument("--loop-items", type=int, default=30)
    parser.add_argument("--judge-items", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's model
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    rows = []
    for key in args.models.split(","):
        child = [sys.executable, __file__, "--one", key]
        for flag in ("items", "loop_items", "judge_items", "max_tokens", "seed"):
            child += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        done = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True)
        row = json.loads(done.stdout)
        row["ask_s"] = ask_seconds(key)
        rows.append(row)
        summary = {k: v for k, v in row.items() if k != "answers"}
        print(json.dumps(summary), flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
