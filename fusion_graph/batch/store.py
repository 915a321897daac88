"""The candidate store: every model reply a batch job makes, written once, in SQLite.

One file (``sqlite3``, WAL mode, each write committed at once, so a killed job loses
nothing it had finished). Two tables:

``candidates``
    One row per candidate, keyed by ``(prompt_id, model, settings, idx)``: the prompt's
    id, the model's name (not its URL: replicas of one model share candidates), a hash of
    the sampling settings (temperature, top_p, max_tokens, seed; ``settings_json`` holds
    them in clear) and the candidate's key within those: the batch jobs use its sampling
    seed (candidate ``i`` of a run has seed ``--seed + i``, as in ``fusion_of_n``), so a
    sample is the same candidate whatever position it takes. Also the prompt's
    ``input_hash`` (a reused id with another prompt is an error, not a silent mix-up),
    the reply (``text`` and the whole message as JSON), token counts, latency and seed.
    Only successful candidates are stored, so a failed one is tried again by the next run.

``calls``
    Replies of the deciding models (fusor, judges), keyed by a hash of the model name,
    the settings and the exact messages sent: the same call is made once, ever.

A second run over the same store therefore replays every candidate and every decision
without calling any model (record and replay), so several strategies (or several runs)
are compared on exactly the same candidates. Inspect it with any SQLite client::

    sqlite3 store.sqlite "select prompt_id, model, idx, substr(text, 1, 60) from candidates"
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from langchain_core.messages import AIMessage, BaseMessage, message_to_dict, messages_from_dict

from fusion_graph.messages import message_text

SCHEMA_VERSION = "2"
"""Schema 2 keys candidates by their seed (schema 1 keyed them by position)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    prompt_id     TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    settings      TEXT    NOT NULL,
    idx           INTEGER NOT NULL,
    input_hash    TEXT    NOT NULL,
    settings_json TEXT    NOT NULL,
    text          TEXT    NOT NULL,
    message       TEXT    NOT NULL,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    latency_s     REAL    NOT NULL,
    seed          INTEGER,
    created_at    REAL    NOT NULL,
    PRIMARY KEY (prompt_id, model, settings, idx)
);
CREATE TABLE IF NOT EXISTS calls (
    key           TEXT    PRIMARY KEY,
    model         TEXT    NOT NULL,
    settings      TEXT    NOT NULL,
    role          TEXT    NOT NULL,
    text          TEXT    NOT NULL,
    message       TEXT    NOT NULL,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    latency_s     REAL    NOT NULL,
    created_at    REAL    NOT NULL
);
"""


class StoreConflictError(ValueError):
    """A prompt id in the store belongs to a different prompt text."""


def settings_hash(settings: Mapping[str, Any]) -> str:
    """16 hex digits identifying sampling settings (order of keys does not matter)."""
    blob = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def call_key(
    model: str, settings: str, messages: Sequence[BaseMessage], options: Mapping[str, Any]
) -> str:
    """The ``calls`` key of one request: model, settings, messages and call options."""
    payload = {
        "model": model,
        "settings": settings,
        "messages": [[m.type, message_text(m), getattr(m, "tool_calls", None)] for m in messages],
        "options": dict(options),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _dump(message: AIMessage) -> str:
    return json.dumps(message_to_dict(message), ensure_ascii=False, default=str)


def _load(blob: str) -> AIMessage:
    message = messages_from_dict([json.loads(blob)])[0]
    if not isinstance(message, AIMessage):
        msg = f"stored message is a {type(message).__name__}, expected an AIMessage"
        raise TypeError(msg)
    return message


def _tokens(message: AIMessage) -> tuple[int | None, int | None]:
    usage = message.usage_metadata
    if not usage:
        return None, None
    return usage.get("input_tokens"), usage.get("output_tokens")


@dataclass(frozen=True, kw_only=True)
class StoredCandidate:
    """A candidate as the store keeps it."""

    index: int
    message: AIMessage
    latency_s: float
    seed: int | None


class CandidateStore:
    """SQLite store of candidates and decision calls (see the module docs). Thread safe;
    several processes may share one file (SQLite locks it)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,)
            )
        elif row[0] != SCHEMA_VERSION:
            self._conn.close()
            msg = (
                f"{self.path} has store schema {row[0]}, this version reads {SCHEMA_VERSION}; "
                "use another store file"
            )
            raise ValueError(msg)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- candidates ---------------------------------------------------------------------------

    def get_candidates(
        self,
        *,
        prompt_id: str,
        model: str,
        settings: str,
        indices: Iterable[int],
        input_hash: str,
    ) -> dict[int, StoredCandidate]:
        """The stored candidates among ``indices`` (missing ones are absent).

        Raises:
            StoreConflictError: the id was stored for a different prompt text.
        """
        wanted = sorted(set(indices))
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        with self._lock:
            rows = self._conn.execute(
                "SELECT idx, input_hash, message, latency_s, seed FROM candidates "
                f"WHERE prompt_id = ? AND model = ? AND settings = ? AND idx IN ({marks})",
                (prompt_id, model, settings, *wanted),
            ).fetchall()
        found: dict[int, StoredCandidate] = {}
        for idx, stored_hash, blob, latency, seed in rows:
            if stored_hash != input_hash:
                msg = (
                    f"the store {self.path} holds prompt id {prompt_id!r} for a different "
                    "prompt text; give the prompts unique ids or use another --store"
                )
                raise StoreConflictError(msg)
            found[int(idx)] = StoredCandidate(
                index=int(idx), message=_load(blob), latency_s=float(latency), seed=seed
            )
        return found

    def put_candidate(
        self,
        *,
        prompt_id: str,
        model: str,
        settings: str,
        index: int,
        input_hash: str,
        settings_json: Mapping[str, Any],
        message: AIMessage,
        latency_s: float,
        seed: int | None,
    ) -> bool:
        """Record a candidate; ``False`` when that key was already stored (kept as is)."""
        input_tokens, output_tokens = _tokens(message)
        with self._lock:
            cursor = self._conn.execute(
                "INSERT OR IGNORE INTO candidates (prompt_id, model, settings, idx, input_hash, "
                "settings_json, text, message, input_tokens, output_tokens, latency_s, seed, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    prompt_id,
                    model,
                    settings,
                    index,
                    input_hash,
                    json.dumps(dict(settings_json), sort_keys=True),
                    message_text(message),
                    _dump(message),
                    input_tokens,
                    output_tokens,
                    latency_s,
                    seed,
                    time.time(),
                ),
            )
            return cursor.rowcount == 1

    # -- decision calls -----------------------------------------------------------------------

    def get_call(self, key: str) -> AIMessage | None:
        """The recorded reply of a decision call, or ``None``."""
        with self._lock:
            row = self._conn.execute("SELECT message FROM calls WHERE key = ?", (key,)).fetchone()
        return _load(row[0]) if row is not None else None

    def put_call(
        self,
        key: str,
        *,
        model: str,
        settings: str,
        role: str,
        message: AIMessage,
        latency_s: float,
    ) -> None:
        """Record a decision call's reply (the first recording of a key wins)."""
        input_tokens, output_tokens = _tokens(message)
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO calls (key, model, settings, role, text, message, "
                "input_tokens, output_tokens, latency_s, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    model,
                    settings,
                    role,
                    message_text(message),
                    _dump(message),
                    input_tokens,
                    output_tokens,
                    latency_s,
                    time.time(),
                ),
            )

    def counts(self) -> dict[str, int]:
        """How many candidates and decision calls the store holds."""
        with self._lock:
            candidates = self._conn.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
            calls = self._conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        return {"candidates": int(candidates), "calls": int(calls)}
