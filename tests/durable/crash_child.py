"""One run of a checkpointed fan-out in a process of its own, for the crash/resume tests.

``run`` mode starts a fresh run on the thread; the candidates listed in ``--hang`` never
finish (their model call sleeps for an hour), so the fan-out stays in flight until the test
kills this process. ``resume`` mode resumes the thread (``graph.invoke(None, config)``) and
prints the final state as one JSON line on stdout.

Every generator call appends its candidate index to the ``--counter`` file (flushed and
fsynced before the reply is made), so the parent sees which candidates were called even in
a process it killed.

    python crash_child.py --db sqlite:/tmp/x.db --shape subgraph --thread t1 --n 8 \
        --counter /tmp/calls.txt --hang 5,6 --mode run

The parent (``test_crash_resume.py``) also imports :func:`build_graph` and
:func:`open_saver` to resume in its own process. Nothing here imports the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import START, MessagesState, StateGraph

from fusion_graph import Candidate, Decision, MajorityVote, best_of_n, create_fusion_graph
from fusion_graph.state import CandidatesChannel, DecisionChannel
from fusion_graph.testing import FakeCall, FakeChatModel

QUESTION = "What is the capital of France?"
HANG_S = 3600.0
SHAPES = ("subgraph", "node")
LYON = frozenset({0, 3})
"""Candidates that answer Lyon; every other one answers Paris, so the vote is Paris and its
winner the lowest-index Paris candidate."""


def reply_text(index: int) -> str:
    """Candidate ``index``'s reply: distinct texts, a deterministic vote."""
    city = "Lyon" if index in LYON else "Paris"
    return f"Candidate {index} thought about it: the answer is {city}."


def winner(n: int) -> tuple[int, str]:
    """The index and text the majority vote picks among ``n`` successful candidates."""
    index = min(i for i in range(n) if i not in LYON)
    return index, reply_text(index)


def append_line(path: Path, line: str) -> None:
    """Append one line so that it survives a SIGKILL right after."""
    with path.open("a", encoding="utf-8") as out:
        out.write(line + "\n")
        out.flush()
        os.fsync(out.fileno())


def counting_model(counter: Path, hang: Sequence[int]) -> FakeChatModel:
    """A fake model that records each generator call in ``counter`` and never returns for
    the candidates in ``hang``."""
    hanging = frozenset(hang)

    def reply(call: FakeCall) -> str:
        if call.role != "generator" or call.index is None:
            append_line(counter, f"{call.role}:{call.index}")  # not expected: BoN by vote
            return "unexpected call"
        append_line(counter, str(call.index))
        if call.index in hanging:
            time.sleep(HANG_S)  # the parent kills this process meanwhile
        return reply_text(call.index)

    return FakeChatModel(replies=reply, model_name="counting-fake")


class NodeState(MessagesState):
    """A user's state that also keeps the wrapped node's candidates and decision."""

    candidates: Annotated[list[Candidate], CandidatesChannel]
    decision: Annotated[Decision | None, DecisionChannel]


def build_graph(
    shape: str, *, n: int, counter: Path, hang: Sequence[int], saver: BaseCheckpointSaver[Any]
) -> Any:
    """The compiled graph of one shape: ``subgraph`` (create_fusion_graph) or ``node`` (a
    StateGraph whose node is a best_of_n-wrapped node function)."""
    model = counting_model(counter, hang)
    if shape == "subgraph":
        graph = create_fusion_graph(model, n=n, strategy="best_of_n", selector=MajorityVote())
        return graph.compile(checkpointer=saver)
    if shape != "node":
        raise ValueError(f"unknown shape {shape!r}, expected one of {SHAPES}")

    def ask(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(NodeState)
    builder.add_node(
        "ask",
        best_of_n(
            ask, n=n, selector=MajorityVote(), candidates_key="candidates", decision_key="decision"
        ),
    )
    builder.add_edge(START, "ask")
    return builder.compile(checkpointer=saver)


@contextmanager
def open_saver(db: str) -> Iterator[BaseCheckpointSaver[Any]]:
    """The checkpointer named by ``db``: ``sqlite:PATH`` (a file on disk) or a
    ``postgresql://`` connection string (its tables set up beforehand by the parent)."""
    if db.startswith("sqlite:"):
        from langgraph.checkpoint.sqlite import SqliteSaver

        conn = sqlite3.connect(db.removeprefix("sqlite:"), check_same_thread=False)
        try:
            yield SqliteSaver(conn)
        finally:
            conn.close()
    elif db.startswith(("postgresql://", "postgres://")):
        from langgraph.checkpoint.postgres import PostgresSaver

        with PostgresSaver.from_conn_string(db) as saver:
            yield saver
    else:
        raise ValueError(f"unknown database {db!r}: expected sqlite:PATH or postgresql://...")


def final_state(out: dict[str, Any]) -> dict[str, Any]:
    """What the parent checks, as JSON-able data."""
    decision = out.get("decision")
    return {
        "answer": out["messages"][-1].text,
        "n": len(out.get("candidates", [])),
        "candidates": [
            {"index": c.index, "ok": c.ok, "text": c.text} for c in out.get("candidates", [])
        ],
        "selected_index": getattr(decision, "selected_index", None),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="sqlite:PATH or postgresql://...")
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument("--thread", required=True)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--counter", type=Path, required=True)
    parser.add_argument("--hang", default="", help="comma-separated candidate indices")
    parser.add_argument("--mode", choices=("run", "resume"), required=True)
    args = parser.parse_args(argv)
    hang = [int(i) for i in args.hang.split(",") if i.strip()]
    config: RunnableConfig = {"configurable": {"thread_id": args.thread}}
    with open_saver(args.db) as saver:
        graph = build_graph(args.shape, n=args.n, counter=args.counter, hang=hang, saver=saver)
        if args.mode == "run":
            graph.invoke({"messages": [("user", QUESTION)]}, config)
            print("the run finished, but hanging candidates should have kept it", file=sys.stderr)
            return 3
        out = graph.invoke(None, config)
    print(json.dumps(final_state(out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
