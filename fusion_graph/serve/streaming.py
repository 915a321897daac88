"""``stream: true``: an answer streamed as Server-Sent Events in OpenAI's
``chat.completion.chunk`` format.

A producer (the fusion run, or the pass-through call) runs as a task and puts what it makes
on a queue: progress (an SSE comment per finished candidate, ``: candidate 2 finished: ok
(0.41 s)``), the answer's chunks as the fusor streams them (Best-of-N: the chosen answer,
once decided), then the finished answer with its usage, or an error. The response starts
(status 200) at the first chunk or successful candidate, so a run that fails before that
(every candidate failed, the upstream refused) still gets its real status; an error after
it arrives as an ``error`` event, as OpenAI sends them. The stream ends with ``data:
[DONE]``. Cancelling the stream (the client went away) cancels the producer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, message_chunk_to_message
from langchain_core.runnables import Runnable

from fusion_graph.events import FusionEvent
from fusion_graph.serve.errors import upstream_failure
from fusion_graph.serve.openai_format import (
    chunk_body,
    chunk_delta,
    finish_reason,
    message_deltas,
)
from fusion_graph.serve.report import pass_through_report, run_report
from fusion_graph.serve.strategy import StrategyChoice
from fusion_graph.types import TokenUsage
from fusion_graph.wrap import FusionRunnable


@dataclass(frozen=True)
class Progress:
    """A line of progress, sent as an SSE comment."""

    text: str
    ok: bool = True
    """False for a failed candidate (which does not start the response by itself)."""


@dataclass(frozen=True)
class Finished:
    """The whole answer, its usage and the ``fusion_graph`` extension."""

    message: AIMessage
    usage: TokenUsage | None
    report: Mapping[str, Any] = field(default_factory=dict)


StreamItem = Progress | AIMessageChunk | Finished | Exception
Put = Callable[[StreamItem], None]
Producer = Callable[[Put], Awaitable[None]]
"""Makes an answer, putting each item on the stream as it comes."""


def fusion_producer(
    runnable: FusionRunnable, conversation: Sequence[BaseMessage], choice: StrategyChoice
) -> Producer:
    """A fusion or Best-of-N run: progress per finished candidate, then the answer."""

    async def produce(put: Put) -> None:
        def on_event(event: FusionEvent) -> None:
            if event["event"] == "candidate_finished":
                error = event["error"] or {}
                state = "ok" if event["ok"] else f"failed, {error.get('type', 'error')}"
                text = f"candidate {event['index']} finished: {state} ({event['latency_s']:.2f} s)"
                put(Progress(text, ok=event["ok"]))
            elif event["event"] == "decision_started":
                put(Progress(f"deciding: {event['method']}"))

        result = await runnable.arun(list(conversation), on_event=on_event, on_token=put)
        put(Finished(result.message, result.usage, run_report(choice, result)))

    return produce


def pass_through_producer(
    model: Runnable[Any, Any] | BaseChatModel,
    conversation: Sequence[BaseMessage],
    choice: StrategyChoice,
) -> Producer:
    """One upstream call, its chunks passed on as they come."""

    async def produce(put: Put) -> None:
        total: AIMessageChunk | None = None
        async for chunk in model.astream(list(conversation)):
            if not isinstance(chunk, AIMessageChunk):
                chunk = AIMessageChunk(content=str(chunk))
            put(chunk)
            total = chunk if total is None else total + chunk
        message = message_chunk_to_message(total) if total is not None else AIMessage(content="")
        assert isinstance(message, AIMessage)
        usage = TokenUsage.of(message)
        put(Finished(message, usage, pass_through_report(choice, usage)))

    return produce


def sse_data(payload: Mapping[str, Any] | str) -> str:
    """One SSE event carrying ``payload`` (JSON) or a literal (``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class StreamedAnswer:
    """An answer in the making, streamed as SSE (see the module docs)."""

    def __init__(self, producer: Producer) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._seen: list[StreamItem] = []
        self._task = asyncio.ensure_future(self._produce(producer))

    async def _produce(self, producer: Producer) -> None:
        try:
            await producer(self._put)
        except Exception as exc:  # handed to the stream
            self._put(exc)

    def _put(self, item: StreamItem) -> None:
        # Callbacks may come from worker threads; call_soon_threadsafe keeps their order.
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def cancel(self) -> None:
        """Stop the producer (and so its upstream calls)."""
        self._task.cancel()

    async def started(self) -> None:
        """Wait for the first item that starts the response: a chunk, a successful
        candidate, or the finished answer.

        Raises:
            Exception: the run's error, when it failed before that.
        """
        while True:
            item = await self._queue.get()
            if isinstance(item, Exception):
                raise item
            self._seen.append(item)
            if not isinstance(item, Progress) or item.ok:
                return

    async def _items(self) -> AsyncIterator[StreamItem]:
        for item in self._seen:
            yield item
        self._seen = []
        while True:
            item = await self._queue.get()
            yield item
            if isinstance(item, Finished | Exception):
                return

    async def sse(self, *, id: str, model: str, include_usage: bool) -> AsyncIterator[str]:
        """The SSE text of the answer, ``[DONE]`` last; cancels the producer if the
        consumer stops early."""
        try:
            yield sse_data(chunk_body(id=id, model=model, delta={"role": "assistant"}))
            streamed = False
            async for item in self._items():
                if isinstance(item, Progress):
                    yield f": {item.text}\n\n"
                elif isinstance(item, AIMessageChunk):
                    delta = chunk_delta(item)
                    if delta is not None:
                        streamed = True
                        yield sse_data(chunk_body(id=id, model=model, delta=delta))
                elif isinstance(item, Exception):
                    yield sse_data(upstream_failure(item).body())
                    return
                else:
                    if not streamed:
                        for delta in message_deltas(item.message):
                            yield sse_data(chunk_body(id=id, model=model, delta=delta))
                    report = None if include_usage else item.report
                    finish = finish_reason(item.message)
                    yield sse_data(chunk_body(id=id, model=model, finish=finish, extension=report))
                    if include_usage:
                        usage = item.usage or TokenUsage()
                        body = chunk_body(id=id, model=model, usage=usage, extension=item.report)
                        yield sse_data(body)
                    yield sse_data("[DONE]")
        finally:
            self.cancel()
