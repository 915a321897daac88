"""Durable fan-out: finished candidates are saved in the checkpointer as they finish.

Inside a LangGraph graph that has a checkpointer, a fan-out keeps a :class:`Journal` of its
finished candidates. Each time some candidates finish, one LangGraph task
(:func:`langgraph.func.task`, named ``candidates_finished``) records them, and LangGraph
saves a task's result as a write of the running node as soon as the task returns. When the
node runs again on the same thread after a crash (an exception escaping the node, or the
process killed), each task call of the earlier attempt returns its saved result instead of
running, in call order: the fan-out reads the journal back, keeps those candidates and makes
only the others. This works wherever the fan-out runs inside a node of a checkpointed
graph: the subgraph's ``generate`` node, a wrapped node, or a wrapped model called in a node.

Why one record per batch of finished candidates, not one task (or ``Send``) per candidate,
measured on this machine with 100 ms calls: a task costs about 0.3 ms of LangGraph
scheduling, paid one after another, and which candidates a resume can skip is only known once
a candidate's task is scheduled; so one ``@task`` per candidate (tried: the task body awaiting
the candidate) delayed the last candidate's start by N x 0.3 ms and committed N times at the
end, +8 ms at N=16 and +37 ms at N=64 over the in-node fan-out (async). A ``Send`` per
candidate is slower still (``python -m benchmarks.durable``: 1.3-1.5x ours async at N=64, and
on the sync path LangGraph's own thread pool of ``cpu_count + 4`` runs them six at a time).
The journal costs one probe before the candidates start (about 1 ms) and one record per
batch: candidates that finish within :data:`LINGER_S` of each other share one.

What stays with the fan-out rather than with LangGraph: a candidate's retries and timeout
(:class:`~fusion_graph.runtime.Caller`: per-attempt timeouts, ``Retry-After``, attempts kept
on the candidate), one multi-sample request for a pool slot's candidates, and failures as
data. Records are plain data (:meth:`Candidate.to_plain`), so they restore without
serializer warnings. A journal is read back only by the same node of the same thread, so
the run's options (``n``, the pool) must not change between the crash and the resume.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import set_config_context
from langgraph.constants import CONFIG_KEY_CHECKPOINTER
from langgraph.func import task

log = logging.getLogger(__name__)

LINGER_S = 0.005
"""How long a finished candidate waits for others to be saved with it: candidates that finish
together (a multi-sample call, a fan-out of equal calls) then cost one record, not one each."""


@dataclass
class _Entry:
    """One task call of the journal: the records it saves (``None`` for a probe) and
    whether its body ran (it does not when LangGraph restores a saved result)."""

    records: list[Any] | None
    ran: bool = False

    def __repr__(self) -> str:  # what a trace shows as the task's input
        return f"{len(self.records or [])} finished candidate(s)"


def _record(entry: _Entry) -> list[Any] | None:
    entry.ran = True
    return entry.records


async def _arecord(entry: _Entry) -> list[Any] | None:
    return _record(entry)


# One name for both, so a record saved by a sync run is found by an async one.
_record.__name__ = _arecord.__name__ = "candidates_finished"
_RECORD, _ARECORD = task(_record), task(_arecord)


class Journal:
    """The saved records of one fan-out in one node run (see the module docs)."""

    def __init__(self, config: RunnableConfig, *, sync: bool) -> None:
        self._config = config
        self._sync = sync
        self._pending: list[Any] = []
        self._writer: asyncio.Task[None] | None = None
        self._saving = False  # a record task is running in LangGraph
        self._off = False  # no task can be called with this config
        self._now = asyncio.Event()  # save without lingering

    @classmethod
    def of(cls, config: RunnableConfig, *, sync: bool) -> Journal | None:
        """The journal of a fan-out running in a node of a checkpointed graph, else None.
        ``sync``: the fan-out runs for a sync call (``invoke``), off the graph's loop."""
        configurable = config.get("configurable") or {}
        return cls(config, sync=sync) if configurable.get(CONFIG_KEY_CHECKPOINTER) else None

    async def read(self) -> list[Any]:
        """Every record saved by earlier attempts of this node, in order."""
        records: list[Any] = []
        while True:
            entry = _Entry(None)
            try:
                saved = await self._call(entry)
            except (RuntimeError, KeyError) as exc:  # a config that is not a running node's
                log.debug("not saving finished candidates: %s", exc)
                self._off = True
                return records
            if entry.ran:  # nothing was saved at this position: the end of the journal
                return records
            records.extend(saved or [])

    def add(self, records: list[Any]) -> None:
        """Save ``records`` (plain data) soon, in the background: after at most
        :data:`LINGER_S`, together with whatever else finishes meanwhile."""
        if self._off:
            return
        self._pending.extend(records)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def flush(self) -> None:
        """Wait until everything added so far is saved."""
        self._now.set()
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def discard(self) -> None:
        """Save nothing more that is not being saved already (the caller saves it, or the
        run is cancelled)."""
        if self._writer is not None and not self._saving:
            self._writer.cancel()

    async def _write(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._now.wait(), LINGER_S)
        while self._pending:
            batch, self._pending = self._pending, []
            self._saving = True
            try:
                await self._call(_Entry(batch))
            except Exception:  # a lost record costs a regeneration on resume, not the run
                log.warning("could not save %d finished candidate(s)", len(batch), exc_info=True)
            finally:
                self._saving = False

    async def _call(self, entry: _Entry) -> Any:
        # An async run calls the async task (no thread hop on the graph's loop); a sync
        # run, or an async run inside a sync graph run, the sync one.
        body = _RECORD if self._sync else _ARECORD
        with set_config_context(self._config) as ctx:
            try:
                saved = ctx.run(body, entry)
            except RuntimeError:  # "In an sync context async tasks cannot be called"
                if body is _RECORD:
                    raise
                self._sync = True
                saved = ctx.run(_RECORD, entry)
        if isinstance(saved, asyncio.Future):
            if saved.get_loop() is not asyncio.get_running_loop():
                return await asyncio.wrap_future(_concurrent(saved))
            return await saved
        return await asyncio.wrap_future(saved)


def _concurrent(future: asyncio.Future[Any]) -> concurrent.futures.Future[Any]:
    """A future of another event loop, as a thread-safe future."""
    result: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def settle(done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            result.cancel()
        elif (exc := done.exception()) is not None:
            result.set_exception(exc)
        else:
            result.set_result(done.result())

    future.get_loop().call_soon_threadsafe(future.add_done_callback, settle)
    return result
