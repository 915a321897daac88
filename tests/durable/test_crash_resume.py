"""A process killed mid fan-out resumes on the same thread and makes only the candidates
that had not finished, against real checkpointers: SQLite on disk and PostgreSQL.

Each scenario runs ``crash_child.py`` twice. The first child starts a run of N=8
candidates in which candidates 5 and 6 never finish; once the other six are finished and
the checkpointer's database holds their records (LangGraph task writes, channel
``__return__``), the test SIGKILLs it. The second child resumes the thread
(``graph.invoke(None, config)``). Every generator call appends its candidate index to a
counter file, so the test sees what each process made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from tests.durable import crash_child

pytestmark = pytest.mark.server

N = 8
HANG = (5, 6)
"""The candidates that have not finished when the first process is killed."""
FINISHED = frozenset(range(N)) - frozenset(HANG)
CHILD = Path(__file__).with_name("crash_child.py")
ROOT = Path(__file__).resolve().parents[2]
CALLED_TIMEOUT_S = 90.0
"""Until the first child has called every candidate (it imports LangGraph first)."""
SAVED_TIMEOUT_S = 10.0
"""Until the database holds the finished candidates' records, once they are finished.
They are written as each candidate finishes, so this is only a bound for a slow machine;
past it the test goes on, and the resume shows what was saved."""
RESUME_TIMEOUT_S = 120.0
RETURN_CHANNEL = "__return__"
"""The channel of a LangGraph task's result (the fan-out's records are task results)."""
SERIALIZER_COMPLAINTS = ("unregistered type", "blocked deserialization")

_SERDE = JsonPlusSerializer()


# ---------------------------------------------------------------------------------------------
# The checkpointers' databases, as the child processes use them and as the test reads them
# ---------------------------------------------------------------------------------------------


def _record_indices(values: list[Any]) -> set[int]:
    """Candidate indices in decoded task results: each record is a finished candidate's
    plain data, ``{"candidate": {"index": ...}, ...}`` (a probe's result is None)."""
    found: set[int] = set()
    for value in values:
        for record in value if isinstance(value, list) else []:
            candidate = record.get("candidate") if isinstance(record, Mapping) else None
            index = candidate.get("index") if isinstance(candidate, Mapping) else None
            if isinstance(index, int):
                found.add(index)
    return found


@dataclass(frozen=True)
class Database:
    """A checkpointer's database: what the children are given, and how to read it."""

    kind: str
    url: str
    """``sqlite:PATH`` or a ``postgresql://`` connection string."""

    def task_results(self, thread_id: str) -> list[Any]:
        """The decoded task results saved for the thread (all its checkpoints)."""
        rows = self._rows(thread_id)
        return [_SERDE.loads_typed((kind, bytes(blob or b""))) for kind, blob in rows]

    def saved_indices(self, thread_id: str) -> set[int]:
        """The candidates whose records the database holds for the thread."""
        return _record_indices(self.task_results(thread_id))

    def _rows(self, thread_id: str) -> list[tuple[str, bytes | None]]:
        if self.kind == "sqlite":
            path = Path(self.url.removeprefix("sqlite:"))
            if not path.exists():
                return []
            try:
                # Read-only, one short read per poll: never in the writer's way.
                with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                    return list(
                        db.execute(
                            "SELECT type, value FROM writes WHERE thread_id = ? AND channel = ?",
                            (thread_id, RETURN_CHANNEL),
                        )
                    )
            except sqlite3.OperationalError:  # not created yet, or busy for a moment
                return []
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(
                "SELECT type, blob FROM checkpoint_writes WHERE thread_id = %s AND channel = %s",
                (thread_id, RETURN_CHANNEL),
            )
            return [(str(kind), blob) for kind, blob in cursor.fetchall()]


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        return Database("sqlite", f"sqlite:{tmp_path / 'checkpoints.sqlite'}")
    return Database("postgres", request.getfixturevalue("postgres_url"))


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Database:
    return Database("sqlite", f"sqlite:{tmp_path / 'checkpoints.sqlite'}")


@pytest.fixture
def thread_id() -> str:
    """A thread of its own for each test (the PostgreSQL database is shared)."""
    return f"durable-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------
# The two processes
# ---------------------------------------------------------------------------------------------


def calls(counter: Path) -> list[str]:
    """The lines of a counter file: one per generator call (its candidate index)."""
    try:
        return [line for line in counter.read_text(encoding="utf-8").splitlines() if line]
    except FileNotFoundError:
        return []


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment with LangGraph's default serializer, plus ``extra``; the children
    import ``fusion_graph`` from this checkout, as this process does."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    env.pop("LANGGRAPH_STRICT_MSGPACK", None)
    return {**env, **(extra or {})}


def child_command(
    database: Database, shape: str, thread_id: str, counter: Path, hang: tuple[int, ...], mode: str
) -> list[str]:
    return [
        sys.executable,
        str(CHILD),
        "--db",
        database.url,
        "--shape",
        shape,
        "--thread",
        thread_id,
        "--n",
        str(N),
        "--counter",
        str(counter),
        "--hang",
        ",".join(map(str, hang)),
        "--mode",
        mode,
    ]


def _wait_until(
    ready: Callable[[], bool], timeout: float, process: subprocess.Popen[bytes] | None
) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return True
        if process is not None and process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


@dataclass(frozen=True)
class Crashed:
    """What the killed process did."""

    calls: list[str]
    """Its counter file: every candidate it called."""
    saved: set[int]
    """The candidates whose records the database held when it was killed."""


def crash_mid_fanout(
    database: Database,
    shape: str,
    thread_id: str,
    workdir: Path,
    env: Mapping[str, str] | None = None,
) -> Crashed:
    """Run the first child until every candidate was called, the finished ones are saved
    (or :data:`SAVED_TIMEOUT_S` passed) and 5 and 6 still hang; then SIGKILL it."""
    counter = workdir / "calls-run.txt"
    log = workdir / "run.log"
    command = child_command(database, shape, thread_id, counter, HANG, "run")
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=child_env(env), cwd=ROOT
        )
    try:
        everyone = Counter(str(i) for i in range(N))
        if not _wait_until(lambda: Counter(calls(counter)) >= everyone, CALLED_TIMEOUT_S, process):
            pytest.fail(
                f"the first run did not call all {N} candidates (called: {calls(counter)}, "
                f"exit code: {process.poll()}); its output ends with:\n"
                f"{log.read_text(errors='replace')[-4000:]}"
            )
        _wait_until(lambda: database.saved_indices(thread_id) >= FINISHED, SAVED_TIMEOUT_S, process)
        assert process.poll() is None, (
            f"the first run ended by itself (exit {process.returncode}) while candidates "
            f"{HANG} hang:\n{log.read_text(errors='replace')[-4000:]}"
        )
        saved = database.saved_indices(thread_id)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    return Crashed(calls=calls(counter), saved=saved)


@dataclass(frozen=True)
class Resumed:
    state: dict[str, Any]
    calls: list[str]
    stderr: str


def resume_in_child(
    database: Database,
    shape: str,
    thread_id: str,
    workdir: Path,
    env: Mapping[str, str] | None = None,
) -> Resumed:
    """The second child: ``graph.invoke(None, config)`` on the same thread."""
    counter = workdir / "calls-resume.txt"
    done = subprocess.run(
        child_command(database, shape, thread_id, counter, (), "resume"),
        capture_output=True,
        text=True,
        env=child_env(env),
        cwd=ROOT,
        timeout=RESUME_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        pytest.fail(
            f"the resume failed (exit {done.returncode}); stderr ends with:\n"
            f"{done.stderr[-4000:]}\nstdout: {done.stdout[-1000:]}"
        )
    state = json.loads(done.stdout.strip().splitlines()[-1])
    return Resumed(state=state, calls=calls(counter), stderr=done.stderr)


def check_resumed(crashed: Crashed, resumed_calls: list[str], state: Mapping[str, Any]) -> None:
    """Only the unfinished candidates were made again, and the run ended as a whole."""
    assert Counter(crashed.calls) == Counter(str(i) for i in range(N)), crashed.calls
    assert Counter(resumed_calls) == Counter(str(i) for i in HANG), (
        f"the resume regenerated candidates {resumed_calls}; it should regenerate only the "
        f"unfinished {list(HANG)}, each once. When the first run was killed, the database "
        f"held the records of candidates {sorted(crashed.saved)} "
        f"(finished: {sorted(FINISHED)})"
    )
    assert crashed.saved >= FINISHED, (
        f"saved before the kill: {sorted(crashed.saved)}, finished: {sorted(FINISHED)}"
    )
    assert state["n"] == N
    assert [c["index"] for c in state["candidates"]] == list(range(N))
    assert all(c["ok"] for c in state["candidates"]), state["candidates"]
    assert [c["text"] for c in state["candidates"]] == [crash_child.reply_text(i) for i in range(N)]
    index, text = crash_child.winner(N)
    assert state["answer"] == text
    assert state["selected_index"] == index


def serializer_complaints(texts: list[str]) -> list[str]:
    return [t for t in texts if any(c in t.lower() for c in SERIALIZER_COMPLAINTS)]


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", crash_child.SHAPES)
def test_killed_fanout_resumes_only_unfinished_candidates(
    database: Database, shape: str, thread_id: str, tmp_path: Path
) -> None:
    crashed = crash_mid_fanout(database, shape, thread_id, tmp_path)
    resumed = resume_in_child(database, shape, thread_id, tmp_path)
    check_resumed(crashed, resumed.calls, resumed.state)
    assert serializer_complaints(resumed.stderr.splitlines()) == []


def test_resume_with_strict_msgpack(
    sqlite_database: Database, thread_id: str, tmp_path: Path
) -> None:
    """``LANGGRAPH_STRICT_MSGPACK=true`` (read when LangGraph is imported, so both children
    run with it) blocks unregistered types: the records and state must restore anyway."""
    strict = {"LANGGRAPH_STRICT_MSGPACK": "true"}
    crashed = crash_mid_fanout(sqlite_database, "subgraph", thread_id, tmp_path, strict)
    resumed = resume_in_child(sqlite_database, "subgraph", thread_id, tmp_path, strict)
    assert serializer_complaints(resumed.stderr.splitlines()) == [], resumed.stderr[-4000:]
    check_resumed(crashed, resumed.calls, resumed.state)


@pytest.fixture
def captured_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.WARNING), caplog.at_level(logging.WARNING, logger="langgraph"):
        yield caplog


@pytest.mark.parametrize("shape", crash_child.SHAPES)
def test_resume_with_the_default_serializer_restores_without_type_warnings(
    sqlite_database: Database,
    shape: str,
    thread_id: str,
    tmp_path: Path,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    """The resume runs in this process, so its logs and warnings are seen here: restoring
    the records (and the final state) complains about no type. (The whole history of a
    wrapped node with ``candidates_key`` does: tests/unit/test_durable.py.)"""
    crashed = crash_mid_fanout(sqlite_database, shape, thread_id, tmp_path)
    counter = tmp_path / "calls-resume.txt"
    config: RunnableConfig = {"configurable": {"thread_id": thread_id}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with crash_child.open_saver(sqlite_database.url) as saver:
            graph = crash_child.build_graph(shape, n=N, counter=counter, hang=(), saver=saver)
            out = graph.invoke(None, config)
            latest = graph.get_state(config)
    complaints = serializer_complaints(
        [r.getMessage() for r in captured_logs.records] + [str(w.message) for w in caught]
    )
    assert complaints == []
    assert not latest.next  # the run is over
    assert len(latest.values["candidates"]) == N
    check_resumed(crashed, calls(counter), crash_child.final_state(out))
