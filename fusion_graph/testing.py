"""Fake chat models for testing graphs that use fusion-graph (yours and ours).

They answer by the role and candidate index fusion-graph puts in each call's metadata,
never by call count, so N parallel calls get the same answers whatever order they land
in. They can be slowed down, fail on chosen candidates, call tools, stream word by word,
and report token usage; a :class:`CallRecorder` sees every call and the peak number in
flight, so tests can check parallelism without timing anything.

Example:
    >>> from fusion_graph import fusion_of_n
    >>> from fusion_graph.testing import FakeChatModel
    >>> gen = FakeChatModel(replies=["Paris", "Lyon", "Paris"])
    >>> fusor = FakeChatModel(replies=["Paris (fused)"])
    >>> fusion_of_n(gen, n=3, fusor=fusor).invoke("Capital of France?").content
    'Paris (fused)'
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, ensure_config
from pydantic import ConfigDict, Field, SkipValidation

from fusion_graph.messages import message_text
from fusion_graph.runtime import INDEX_KEY, ROLE_KEY, CallStopped, stop_requested

__all__ = ["CallRecorder", "FakeCall", "FakeChatModel", "FakeSamplingChatModel", "tool_call"]


@dataclass(frozen=True)
class FakeCall:
    """One call a fake model received."""

    messages: list[BaseMessage]
    """What the model was sent."""
    role: str | None
    """``"generator"``, ``"critic"``, ``"fusor"``, ``"judge"``, or ``None`` outside a run."""
    index: int | None
    """The candidate index (generator and critic calls), else ``None``."""
    kwargs: dict[str, Any]
    """Call options such as ``seed``, ``temperature`` or bound ``tools``."""

    @property
    def prompt(self) -> str:
        """All message texts joined: handy for ``in`` assertions."""
        return "\n".join(message_text(m) for m in self.messages)

    @property
    def last(self) -> str:
        """The text of the last message."""
        return message_text(self.messages[-1]) if self.messages else ""


class CallRecorder:
    """Thread-safe record of calls: every :class:`FakeCall`, and calls in flight."""

    def __init__(self) -> None:
        self.calls: list[FakeCall] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled: list[FakeCall] = []
        """Calls that ended because they were cancelled (async) or told to stop (sync,
        :func:`~fusion_graph.runtime.stop_requested`), in the order they ended."""
        self._lock = threading.Lock()

    def enter(self, call: FakeCall) -> None:
        with self._lock:
            self.calls.append(call)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def exit(self, call: FakeCall | None = None, *, cancelled: bool = False) -> None:
        with self._lock:
            self.in_flight -= 1
            if cancelled and call is not None:
                self.cancelled.append(call)

    def by_role(self, role: str) -> list[FakeCall]:
        """Calls made in one role, in the order they started."""
        with self._lock:
            return [c for c in self.calls if c.role == role]


Reply = str | AIMessage | BaseException
"""What a fake answers: text, a full message (e.g. with tool calls), or an error to raise."""


def tool_call(name: str, args: Mapping[str, Any], *, id: str | None = None) -> dict[str, Any]:
    """A tool call for ``AIMessage(tool_calls=[...])`` in fake replies."""
    return {"name": name, "args": dict(args), "id": id or f"call_{name}", "type": "tool_call"}


class FakeChatModel(BaseChatModel):
    """A chat model that replies by candidate index (and role), never by call count.

    Args:
        replies: A list (candidate ``i`` gets ``replies[i % len]``; calls that are not
            candidates get ``replies[0]``), or a function ``(FakeCall) -> Reply``.
            A reply that is an exception is raised.
        delay: Seconds each call takes (``time.sleep`` / ``asyncio.sleep``).
        delays: Seconds by candidate index (``delays[i % len]``), for the calls that have
            one (generator and critic calls); other calls take ``delay``. A sync call that
            is told to stop (:func:`~fusion_graph.runtime.stop_requested`) stops within
            10 ms, like the embedded model between tokens.
        recorder: Where calls are recorded.
        model_name: The name recorded on candidates.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    replies: SkipValidation[Sequence[Reply] | Callable[[FakeCall], Reply]] = Field(default=("ok",))
    """The answers, by candidate index, or a function of the call."""
    delay: float = 0.0
    """Seconds per call."""
    delays: Sequence[float] | None = None
    """Seconds per generator or critic call, by candidate index."""
    recorder: CallRecorder | None = None
    """Records every call."""
    model_name: str = "fake-chat"
    """Recorded as the candidate's model."""
    seed: int | None = None
    """Accepted so fusion-graph gives each candidate its own seed (recorded in kwargs)."""
    temperature: float | None = None
    """Accepted like ``seed``."""
    usage: bool = True
    """Report token usage (word counts)."""

    @property
    def _llm_type(self) -> str:
        return "fusion-graph-fake"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable[Any, AIMessage]:
        """Bind tools (recorded in the call's kwargs; replies decide what to call)."""
        names = [getattr(t, "name", getattr(t, "__name__", str(t))) for t in tools]
        return self.bind(tools=names, **kwargs)

    def _call(
        self, messages: list[BaseMessage], run_manager: Any, kwargs: dict[str, Any]
    ) -> FakeCall:
        # The call's metadata; from the context config when langchain-core streams without a
        # run manager (an agent in stream_mode="messages").
        metadata = getattr(run_manager, "metadata", None) or ensure_config().get("metadata", {})
        return FakeCall(
            messages=list(messages),
            role=metadata.get(ROLE_KEY),
            index=metadata.get(INDEX_KEY),
            kwargs={k: v for k, v in kwargs.items() if k != "stop"},
        )

    def _reply(self, call: FakeCall) -> AIMessage:
        if callable(self.replies):
            reply = self.replies(call)
        else:
            reply = self.replies[(call.index or 0) % len(self.replies)]
        if isinstance(reply, BaseException):
            raise reply
        message = reply.model_copy() if isinstance(reply, AIMessage) else AIMessage(content=reply)
        if self.usage:
            prompt = sum(len(message_text(m).split()) for m in call.messages)
            output = len(message_text(message).split())
            message.usage_metadata = {
                "input_tokens": prompt,
                "output_tokens": output,
                "total_tokens": prompt + output,
            }
        message.response_metadata = {"model_name": self.model_name}
        return message

    @contextmanager
    def _recorded(self, call: FakeCall) -> Iterator[FakeCall]:
        if self.recorder:
            self.recorder.enter(call)
        cancelled = False
        try:
            yield call
        except (asyncio.CancelledError, CallStopped):
            cancelled = True
            raise
        finally:
            if self.recorder:
                self.recorder.exit(call, cancelled=cancelled)

    def _delay(self, call: FakeCall) -> float:
        if self.delays and call.role in ("generator", "critic"):
            return self.delays[(call.index or 0) % len(self.delays)]
        return self.delay

    def _wait(self, call: FakeCall) -> None:
        """Sleep the call's delay, stopping early (``CallStopped``) when told to."""
        end = time.monotonic() + self._delay(call)
        while True:
            if stop_requested():  # checked after the last step too: a stopped call never replies
                msg = "the fake was told to stop"
                raise CallStopped(msg)
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.01))

    async def _await(self, call: FakeCall) -> None:
        if delay := self._delay(call):
            await asyncio.sleep(delay)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        with self._recorded(self._call(messages, run_manager, kwargs)) as call:
            self._wait(call)
            return ChatResult(generations=[ChatGeneration(message=self._reply(call))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        with self._recorded(self._call(messages, run_manager, kwargs)) as call:
            await self._await(call)
            return ChatResult(generations=[ChatGeneration(message=self._reply(call))])

    def _chunks(self, message: AIMessage) -> Iterator[ChatGenerationChunk]:
        words = message_text(message).split(" ")
        for i, word in enumerate(words):
            last = i == len(words) - 1
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content=word if i == 0 else f" {word}",
                    tool_call_chunks=[
                        {"name": c["name"], "args": _json(c["args"]), "id": c["id"], "index": k}
                        for k, c in enumerate(message.tool_calls)
                    ]
                    if last
                    else [],
                    usage_metadata=message.usage_metadata if last else None,
                    response_metadata=message.response_metadata if last else {},
                )
            )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        with self._recorded(self._call(messages, run_manager, kwargs)) as call:
            self._wait(call)
            for chunk in self._chunks(self._reply(call)):
                if run_manager:
                    run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        with self._recorded(self._call(messages, run_manager, kwargs)) as call:
            await self._await(call)
            for chunk in self._chunks(self._reply(call)):
                if run_manager:
                    await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
                yield chunk


class FakeSamplingChatModel(FakeChatModel):
    """A :class:`FakeChatModel` that also makes N samples in one call (``sample_n``), like
    the embedded llama.cpp model: fusion-graph then asks it for all its candidates at once.
    Sample ``k`` of a call gets ``replies[k % len]``; each call is recorded once, with the
    seeds in ``kwargs["seeds"]``."""

    def sample_n(
        self, messages: Sequence[BaseMessage], *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]:
        call = FakeCall(list(messages), "generator", None, {"seeds": list(seeds), **kwargs})
        with self._recorded(call):
            self._wait(call)
            return [self._sample(call, k) for k in range(len(seeds))]

    async def asample_n(
        self, messages: Sequence[BaseMessage], *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]:
        call = FakeCall(list(messages), "generator", None, {"seeds": list(seeds), **kwargs})
        with self._recorded(call):
            await self._await(call)
            return [self._sample(call, k) for k in range(len(seeds))]

    def _sample(self, call: FakeCall, k: int) -> AIMessage | Exception:
        try:
            return self._reply(FakeCall(call.messages, call.role, k, call.kwargs))
        except Exception as exc:
            return exc


def _json(args: Mapping[str, Any]) -> str:
    import json

    return json.dumps(dict(args))
