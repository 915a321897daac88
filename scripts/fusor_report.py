"""How the fusor behaved in an `fusion-graph eval` run: loops, echoes of the prompt's own
wording, replies cut at max_tokens, and accuracy against the candidates it was given.

    .venv/bin/python scripts/fusor_report.py eval-results     # the eval's --out directory

Reads the run's store (every fusor reply, with its finish reason) and answers.jsonl (each
item's fused answer at each N and whether its candidates were right, by the `contains`
matcher). Prints one table per N.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
from collections import Counter
from pathlib import Path

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

    by_n: dict[int, Counter[str]] = {}
    for line in (args.out / "answers.jsonl").read_text().splitlines():
        item = json.loads(line)
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


if __name__ == "__main__":
    main()
