"""A closer look at an `fusion-graph eval` run: how the fusor behaved (loops, echoes of the
prompt's own wording, replies cut at max_tokens, accuracy against the candidates it was
given) and each strategy's accuracy per category of the built-in set.

    .venv/bin/python scripts/eval_breakdown.py eval-results     # the eval's --out directory

Reads the run's store (every fusor reply, with its finish reason) and answers.jsonl (every
answer and candidate, right or not by the `contains` matcher). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from fusion_graph.batch.data import builtin_eval_set, read_prompts
from fusion_graph.integrations.repeat_guard import repeated_sentences

ECHO = re.compile(
    r"candidate|fenced|the user'?s last message|final reply|fusor|assistants? (?:answered|wrote)",
    re.IGNORECASE,
)
"""Wording of the fusion prompt that has no place in an answer to the user."""


def fusor_replies(store: Path) -> list[dict[str, object]]:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        rows = db.execute("select text, message from calls where role = 'fusor'").fetchall()
    out = []
    for text, message in rows:
        meta = json.loads(message).get("data", {}).get("response_metadata", {})
        out.append({"text": text, "finish_reason": meta.get("finish_reason")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="The eval's --out directory.")
    args = parser.parse_args()
    replies = fusor_replies(args.out / "store.sqlite")
    looped = sum(any(c >= 3 for c in repeated_sentences(str(r["text"])).values()) for r in replies)
    echoed = [r["text"] for r in replies if ECHO.search(str(r["text"]))]
    cut = sum(r["finish_reason"] == "length" for r in replies)
    print(
        f"fusor replies: {len(replies)}; looping: {looped}; echoing the prompt: {len(echoed)}; "
        f"cut at max_tokens: {cut}"
    )
    for text in echoed[:5]:
        print(f"  echo: {str(text)[:100]!r}")

    items = [json.loads(line) for line in (args.out / "answers.jsonl").read_text().splitlines()]
    fusor_table(items)
    category_table(items)


def fusor_table(items: list[dict[str, Any]]) -> None:
    by_n: dict[int, Counter[str]] = {}
    for item in items:
        right = [bool(c.get("contains")) for c in item["candidates"]]
        for answer in item["answers"]:
            if answer["strategy"] != "fusion" or answer["contains"] is None:
                continue
            n = int(answer["n"])
            pool = right[:n]
            counts = by_n.setdefault(n, Counter())
            counts["items"] += 1
            counts["fusion right"] += answer["contains"]
            counts["some candidate right"] += any(pool)
            counts["mean candidate right"] += sum(pool) / len(pool)
            if answer["contains"] and not any(pool):
                counts["right, no candidate right"] += 1
            if not answer["contains"] and any(pool):
                counts["wrong, some candidate right"] += 1
            if not answer["contains"] and all(pool):
                counts["wrong, every candidate right"] += 1
    print(
        "| N | items | fusion right | some candidate right (oracle) | mean candidate right "
        "| right where no candidate was | wrong where some candidate was right "
        "| wrong where every candidate was right |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, c in sorted(by_n.items()):
        k = c["items"]
        print(
            f"| {n} | {k} | {c['fusion right'] / k:.1%} | {c['some candidate right'] / k:.1%} "
            f"| {c['mean candidate right'] / k:.1%} | {c['right, no candidate right']} "
            f"| {c['wrong, some candidate right']} | {c['wrong, every candidate right']} |"
        )


def category_table(items: list[dict[str, Any]]) -> None:
    """Each strategy's contains-accuracy per category at the largest N (and single)."""
    category = {i.id: str(i.extra.get("category")) for i in read_prompts(builtin_eval_set()).items}
    top = max(int(a["n"]) for item in items for a in item["answers"])
    right: dict[str, Counter[str]] = {}
    counts: Counter[str] = Counter()
    for item in items:
        group = category.get(item["id"], "other")
        counts[group] += 1
        for answer in item["answers"]:
            n = int(answer["n"])
            if (answer["strategy"] == "single" or n == top) and answer["contains"] is not None:
                key = (
                    answer["strategy"]
                    if answer["strategy"] == "single"
                    else f"{answer['strategy']}@{n}"
                )
                right.setdefault(key, Counter())[group] += bool(answer["contains"])
        right.setdefault(f"oracle@{top}", Counter())[group] += bool(
            item["oracle"][str(top)]["contains"]
        )
    groups = sorted(counts)
    print(f"\n| strategy | {' | '.join(f'{g} ({counts[g]})' for g in groups)} |")
    print(f"|---|{'---|' * len(groups)}")
    for key, hits in right.items():
        cells = " | ".join(f"{hits[g] / counts[g]:.0%}" for g in groups)
        print(f"| {key} | {cells} |")


if __name__ == "__main__":
    main()
