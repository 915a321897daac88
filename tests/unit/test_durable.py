"""The durable fan-out in-process (InMemorySaver): a crash mid fan-out, then a resume on
the same thread (``invoke(None, config)``) makes only the candidates that had not finished.

The crash is a ``BaseException`` of the test's own (not an ``Exception``, so it is never a
failed candidate): candidate 5 raises it on the first run only, once every other candidate
has returned and the checkpointer holds their records, so which candidates had finished is
the same on every run. The real-process version (SIGKILL, SQLite and PostgreSQL) is
``tests/durable``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import pytest
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig, ensure_config
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from pydantic import SkipValidation

from fusion_graph import Candidate, Decision, MajorityVote, best_of_n, create_fusion_graph
from fusion_graph.runtime import INDEX_KEY
from fusion_graph.state import CandidatesChannel, DecisionChannel
from fusion_graph.testing import CallRecorder, FakeChatModel
from tests.conftest import Mode

N = 8
CRASHING = frozenset({5})
OTHERS = frozenset(range(N)) - CRASHING
RETURNED_TIMEOUT_S = 10.0
"""Until the other candidates' calls have returned (they take no time)."""
SAVED_TIMEOUT_S = 3.0
"""Until the checkpointer holds their records, once they returned. Records are written as
candidates finish, so this is only a bound; past it the crash comes anyway, and the
resume shows what was saved."""
RETURN_CHANNEL = "__return__"
"""The channel of a LangGraph task's result (the fan-out's records are task results)."""


class Crash(BaseException):
    """Ends the run mid fan-out like a crash: not an ``Exception``, so it escapes."""


def reply_text(index: int) -> str:
    city = "Lyon" if index in (0, 3) else "Paris"
    return f"Candidate {index}: the answer is {city}."


WINNER = 1  # the lowest-index Paris


def saved_indices(saver: InMemorySaver, config: RunnableConfig) -> set[int]:
    """The candidates whose records the thread's latest checkpoint holds (task results)."""
    try:
        saved = saver.get_tuple(config)
    except RuntimeError:  # the saver's dicts changed size while read from another thread
        return set()
    found: set[int] = set()
    for _, channel, value in (saved.pending_writes or []) if saved is not None else []:
        for record in value if channel == RETURN_CHANNEL and isinstance(value, list) else []:
            candidate = record.get("candidate") if isinstance(record, Mapping) else None
            index = candidate.get("index") if isinstance(candidate, Mapping) else None
            if isinstance(index, int):
                found.add(index)
    return found


class CrashingModel(FakeChatModel):
    """While ``crashing``, the candidates in ``crash_on`` wait until ``returned()`` and then
    ``saved()`` (each with a deadline), then raise :class:`Crash`; answers otherwise.

    ``invoke`` / ``ainvoke`` raise it themselves: langchain-core's async ``agenerate``
    would turn a ``BaseException`` raised inside ``_agenerate`` into an ``AttributeError``.
    """

    crash_on: frozenset[int]
    returned: SkipValidation[Callable[[], bool]]
    saved: SkipValidation[Callable[[], bool]]
    crashing: bool = True

    def _crashes(self, config: RunnableConfig | None) -> bool:
        index = ensure_config(config).get("metadata", {}).get(INDEX_KEY)
        return self.crashing and index in self.crash_on

    def _waits(self) -> list[tuple[Callable[[], bool], float]]:
        """What to wait for before crashing, in order, each with its timeout."""
        return [(self.returned, RETURNED_TIMEOUT_S), (self.saved, SAVED_TIMEOUT_S)]

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if self._crashes(config):
            for ready, timeout in self._waits():
                deadline = time.monotonic() + timeout
                while not ready() and time.monotonic() < deadline:
                    time.sleep(0.002)
            raise Crash
        return super().invoke(input, config, **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if self._crashes(config):
            for ready, timeout in self._waits():
                deadline = time.monotonic() + timeout
                while not ready() and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.002)
            raise Crash
        return await super().ainvoke(input, config, **kwargs)


class NodeState(MessagesState):
    candidates: Annotated[list[Candidate], CandidatesChannel]
    decision: Annotated[Decision | None, DecisionChannel]


def build(shape: str, mode: Mode, model: FakeChatModel, saver: InMemorySaver) -> Any:
    if shape == "subgraph":
        graph = create_fusion_graph(model, n=N, strategy="best_of_n", selector=MajorityVote())
        return graph.compile(checkpointer=saver)

    def ask(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    async def aask(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    wrapped = best_of_n(
        ask if mode.sync else aask,
        n=N,
        selector=MajorityVote(),
        candidates_key="candidates",
        decision_key="decision",
    )
    builder = StateGraph(NodeState)
    builder.add_node("ask", wrapped)
    builder.add_edge(START, "ask")
    return builder.compile(checkpointer=saver)


@pytest.mark.parametrize("shape", ["subgraph", "node"])
def test_crash_mid_fanout_resumes_only_the_unfinished_candidates(mode: Mode, shape: str) -> None:
    saver = InMemorySaver()
    config: RunnableConfig = {"configurable": {"thread_id": f"crash-{shape}-{mode.name}"}}
    rec = CallRecorder()

    def returned() -> bool:
        made = {c.index for c in rec.by_role("generator")}
        return made >= OTHERS and rec.in_flight == 0  # every other call entered and left

    model = CrashingModel(
        replies=lambda call: reply_text(call.index or 0),
        recorder=rec,
        crash_on=CRASHING,
        returned=returned,
        saved=lambda: saved_indices(saver, config) >= OTHERS,
    )
    app = build(shape, mode, model, saver)

    with pytest.raises(Crash):
        mode.invoke(app, {"messages": [("user", "Capital of France?")]}, config)
    first = sorted(c.index for c in rec.by_role("generator"))
    saved = saved_indices(saver, config)
    rec.calls.clear()
    model.crashing = False
    out = mode.invoke(app, None, config)

    assert first == sorted(OTHERS)  # the crashing candidate never reached the fake
    again = sorted(c.index for c in rec.by_role("generator"))
    assert again == sorted(CRASHING), (
        f"the resume regenerated candidates {again}; only the unfinished "
        f"{sorted(CRASHING)} should be. The checkpointer held records of {sorted(saved)} "
        f"when the run crashed (finished: {sorted(OTHERS)})"
    )
    assert saved >= OTHERS
    candidates = out["candidates"]
    assert [c.index for c in candidates] == list(range(N))
    assert all(c.ok for c in candidates)
    assert [c.text for c in candidates] == [reply_text(i) for i in range(N)]
    assert isinstance(out["messages"][-1], AIMessage)
    assert out["messages"][-1].text == reply_text(WINNER)
    assert out["decision"].selected_index == WINNER
