"""What durability costs: fusion-graph's fan-out with a checkpointer against the same graph
without one, a hand-written in-node gather (the floor, not durable) and the LangGraph-native
durable way (one ``Send`` per candidate).

python -m benchmarks.durable [--sizes 4,16,64] [--repeats 5] [--latency 0.1]

Every variant is a best-of-N with a majority vote (no model call in the decision), so the
ideal run takes one model latency. Models are :class:`~fusion_graph.testing.FakeChatModel`
with a fixed delay (``time.sleep`` / ``asyncio.sleep``). Each run uses a fresh
``thread_id``. Variants are warmed up once, then timed round-robin (one run of each variant
per repeat), so drift on the machine lands on all of them alike; the figures are medians
and every ratio is taken between timings of the same run.

Variants, for the sync path (``graph.invoke``) and the async path (``graph.ainvoke``):

* ``durable``: ``create_fusion_graph(model, n=N, strategy="best_of_n",
  selector=MajorityVote())``
  compiled with ``InMemorySaver``;
* ``no ckpt``: the same graph compiled without a checkpointer (the fan-out records
  candidates only when there is one), so ``durable ÷ no ckpt`` is the cost of durability;
* ``floor``: a hand-written node making the N calls at once (``asyncio.gather``, or a
  thread pool of N for sync), then a vote node, with ``InMemorySaver``: not durable;
* ``Send``: a router returning one ``Send("candidate", ...)`` per candidate, a node calling
  the model once into an ``operator.add`` list channel, then a vote node, with
  ``InMemorySaver``: durable, each candidate is a LangGraph task. ``Send, mc=N`` is the same
  run with ``config={"max_concurrency": N}``: on the sync path LangGraph runs tasks on a
  thread pool whose default size is small (``min(32, cores + 4)``), which a user has to
  discover and raise.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import operator
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Send

from fusion_graph import MajorityVote, create_fusion_graph
from fusion_graph.testing import FakeChatModel

HERE = Path(__file__).parent
LATENCY = 0.1
SIZES = [4, 16, 64]
REPEATS = 5
PATHS = ("sync", "async")
VARIANTS = ("durable", "no ckpt", "floor", "Send", "Send, mc=N")
# durable ÷ no-checkpointer targets, by N
TARGETS = {16: 1.05, 64: 1.10}
QUESTION = {"messages": [("user", "What is 2 + 2?")]}


def _model(latency: float) -> FakeChatModel:
    return FakeChatModel(replies=["4", "4", "5"], delay=latency, usage=False)


class _State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    candidates: Annotated[list[str], operator.add]


class _One(TypedDict):
    messages: list[AnyMessage]
    index: int


def _vote(state: _State) -> dict[str, Any]:
    answer, _ = Counter(state["candidates"]).most_common(1)[0]
    return {"messages": [AIMessage(content=answer)]}


def _ours(n: int, latency: float, *, checkpointer: bool) -> Any:
    model = _model(latency)
    builder = create_fusion_graph(model, n=n, strategy="best_of_n", selector=MajorityVote())
    return builder.compile(checkpointer=InMemorySaver() if checkpointer else None)


def _gather_floor(n: int, latency: float) -> Any:
    """One node making the N calls at once, then a vote: the floor (not durable)."""
    model = _model(latency)
    pool = ThreadPoolExecutor(max_workers=n)

    def generate(state: _State) -> dict[str, Any]:
        replies = list(pool.map(lambda _: model.invoke(state["messages"]), range(n)))
        return {"candidates": [r.text for r in replies]}

    async def agenerate(state: _State) -> dict[str, Any]:
        replies = await asyncio.gather(*(model.ainvoke(state["messages"]) for _ in range(n)))
        return {"candidates": [r.text for r in replies]}

    builder = StateGraph(_State)
    builder.add_node("generate", RunnableLambda(generate, afunc=agenerate, name="generate"))
    builder.add_node("vote", _vote)
    builder.add_edge(START, "generate")
    builder.add_edge("generate", "vote")
    return builder.compile(checkpointer=InMemorySaver())


def _send_fanout(n: int, latency: float) -> Any:
    """One ``Send`` (a LangGraph task) per candidate, then a vote: the native durable way."""
    model = _model(latency)

    def route(state: _State) -> list[Send]:
        return [Send("candidate", {"messages": state["messages"], "index": i}) for i in range(n)]

    def candidate(one: _One) -> dict[str, Any]:
        return {"candidates": [model.invoke(one["messages"]).text]}

    async def acandidate(one: _One) -> dict[str, Any]:
        return {"candidates": [(await model.ainvoke(one["messages"])).text]}

    builder = StateGraph(_State)
    builder.add_node("candidate", RunnableLambda(candidate, afunc=acandidate, name="candidate"))
    builder.add_node("vote", _vote)
    builder.add_conditional_edges(START, route, ["candidate"])
    builder.add_edge("candidate", "vote")
    return builder.compile(checkpointer=InMemorySaver())


@dataclass
class _Variant:
    name: str
    graph: Any
    max_concurrency: int | None = None

    def config(self) -> RunnableConfig:
        config: RunnableConfig = {"configurable": {"thread_id": str(uuid.uuid4())}}
        if self.max_concurrency is not None:
            config["max_concurrency"] = self.max_concurrency
        return config


def _variants(n: int, latency: float) -> list[_Variant]:
    send = _send_fanout(n, latency)
    return [
        _Variant("durable", _ours(n, latency, checkpointer=True)),
        _Variant("no ckpt", _ours(n, latency, checkpointer=False)),
        _Variant("floor", _gather_floor(n, latency)),
        _Variant("Send", send),
        _Variant("Send, mc=N", send, max_concurrency=n),
    ]


def _check(out: Any, variant: str) -> None:
    if out["messages"][-1].text != "4":
        msg = f"{variant}: unexpected answer {out['messages'][-1].text!r}"
        raise RuntimeError(msg)


def _time_sync(variants: list[_Variant], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for v in variants:  # warm-up
        _check(v.graph.invoke(QUESTION, v.config()), v.name)
    for _ in range(repeats):
        for v in variants:
            config = v.config()
            gc.collect()
            start = time.perf_counter()
            v.graph.invoke(QUESTION, config)
            times[v.name].append(time.perf_counter() - start)
    return times


def _time_async(variants: list[_Variant], repeats: int) -> dict[str, list[float]]:
    async def all_runs() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        for v in variants:  # warm-up
            _check(await v.graph.ainvoke(QUESTION, v.config()), v.name)
        for _ in range(repeats):
            for v in variants:
                config = v.config()
                gc.collect()
                start = time.perf_counter()
                await v.graph.ainvoke(QUESTION, config)
                times[v.name].append(time.perf_counter() - start)
        return times

    return asyncio.run(all_runs())


def measure(
    sizes: list[int],
    latency: float = LATENCY,
    repeats: int = REPEATS,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (N, path): the median wall seconds of each variant and the ratios."""
    rows: list[dict[str, Any]] = []
    for n in sizes:
        for path in PATHS:
            if progress:
                progress(f"N={n} {path} ...")
            variants = _variants(n, latency)
            timer = _time_sync if path == "sync" else _time_async
            medians = {k: statistics.median(v) for k, v in timer(variants, repeats).items()}
            durable = medians["durable"]
            rows.append(
                {
                    "n": n,
                    "path": path,
                    "wall_s": medians,
                    "vs_no_ckpt": durable / medians["no ckpt"],
                    "vs_send": durable / medians["Send"],
                    "vs_send_mc": durable / medians["Send, mc=N"],
                    "vs_floor": durable / medians["floor"],
                    "vs_ideal": durable / latency,
                }
            )
    return rows


def _target_note(row: dict[str, Any]) -> str:
    notes = []
    limit = TARGETS.get(row["n"])
    if limit is not None:
        ok = row["vs_no_ckpt"] <= limit
        notes.append(f"÷ no ckpt <= {limit:.2f}: {'met' if ok else 'missed'}")
    ok = row["vs_send"] < 1 and row["vs_send_mc"] < 1
    notes.append(f"÷ Send < 1: {'met' if ok else 'missed'}")
    return "; ".join(notes)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The table: median wall ms of each variant, then durable's ratios."""
    ms_cells = " | ".join(f"{v} ms" for v in VARIANTS)
    lines = [
        f"| N | path | {ms_cells} | ÷ no ckpt | ÷ Send | ÷ Send, mc=N | ÷ floor | ÷ ideal "
        "| target |",
        "|---:|---|" + "---:|" * (len(VARIANTS) + 5) + "---|",
    ]
    for r in rows:
        ms = " | ".join(f"{r['wall_s'][v] * 1000:.1f}" for v in VARIANTS)
        lines.append(
            f"| {r['n']} | {r['path']} | {ms} | {r['vs_no_ckpt']:.3f} | {r['vs_send']:.3f} | "
            f"{r['vs_send_mc']:.3f} | {r['vs_floor']:.3f} | {r['vs_ideal']:.3f} | "
            f"{_target_note(r)} |"
        )
    return "\n".join(lines)


def _revision() -> str:
    """The commit measured, and whether the library had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(HERE.parent), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE.parent), "status", "--porcelain", "fusion_graph"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"`{head}`" + (" plus uncommitted changes under fusion_graph/" if dirty else "")


def legend(latency: float) -> str:
    """What the columns mean (for results.md and durable.md)."""
    return (
        f"Best-of-N with a majority vote, model calls simulated at {latency * 1000:.0f} ms, "
        "a fresh `thread_id` per run, medians. `durable`: `create_fusion_graph(..., "
        'strategy="best_of_n", selector=MajorityVote())` compiled with `InMemorySaver`; `no ckpt`: '
        "the same graph without a checkpointer; `floor`: a hand-written node doing the N "
        "calls at once (`asyncio.gather` / a thread pool of N), not durable; `Send`: one "
        '`Send("candidate", ...)` per candidate into an `operator.add` channel (LangGraph\'s '
        'durable way); `Send, mc=N`: the same with `config={"max_concurrency": N}`. Ratios '
        "are durable's wall time over each; ideal = one model latency."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.durable", description=__doc__)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="N values, e.g. 4,16")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per variant")
    parser.add_argument("--latency", type=float, default=LATENCY, help="seconds per model call")
    parser.add_argument("--out", type=Path, default=HERE / "durable.md", help="markdown output")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    started = time.perf_counter()
    rows = measure(sizes, args.latency, args.repeats, lambda s: print(s, file=sys.stderr))
    elapsed = time.perf_counter() - started
    command = "python -m benchmarks.durable" + (f" {' '.join(argv)}" if argv else "")
    if argv is None and len(sys.argv) > 1:
        command = "python -m benchmarks.durable " + " ".join(sys.argv[1:])
    text = "\n\n".join(
        [
            "# Durable fan-out: the cost of a checkpointer",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}. Command: `{command}` ({args.repeats} timed runs "
            f"per variant, {elapsed:.0f} s). Code: {_revision()}.",
            legend(args.latency),
            to_markdown(rows),
        ]
    )
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
