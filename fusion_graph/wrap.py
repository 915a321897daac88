"""``fusion_of_n`` and ``best_of_n``: wrap a model, any Runnable, or a LangGraph node so
that one call becomes N parallel candidates and one fused or selected answer."""

from __future__ import annotations

import asyncio
import contextvars
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Literal, cast

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    convert_to_messages,
)
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config
from langgraph.types import RetryPolicy

from fusion_graph.engine import FusionEngine, RunResult, build_engine
from fusion_graph.nodes.calls import run_sync
from fusion_graph.nodes.fuse import token_sink
from fusion_graph.nodes.select import Selector
from fusion_graph.prompts import CRITIQUE_PROMPT, FUSION_PROMPT, PromptTemplate, message_text

FusionResult = RunResult
"""What :meth:`FusionRunnable.run` returns: the answer, every candidate, the decision."""


def to_messages(value: Any) -> list[BaseMessage]:
    """The conversation in a model input (str, messages, prompt value); raises
    ``ValueError`` for an empty prompt."""
    if isinstance(value, PromptValue):
        messages = value.to_messages()
    elif isinstance(value, str):
        messages = [HumanMessage(value)]
    elif isinstance(value, BaseMessage):
        messages = [value]
    elif isinstance(value, Sequence):
        messages = convert_to_messages(value)
    else:
        msg = f"expected a string, messages or a prompt value, got {type(value).__name__}"
        raise TypeError(msg)
    if not any(
        message_text(m).strip() or (isinstance(m, AIMessage) and m.tool_calls) for m in messages
    ):
        msg = "the prompt is empty: give the model a question or some messages"
        raise ValueError(msg)
    return messages


def state_messages(state: Any) -> list[BaseMessage]:
    """``messages`` of a graph state (dict, pydantic model or dataclass)."""
    messages = (
        state.get("messages") if isinstance(state, Mapping) else getattr(state, "messages", None)
    )
    if messages is None:
        msg = "the state has no 'messages': wrapped nodes need a MessagesState-like state"
        raise ValueError(msg)
    return to_messages(list(messages))


class FusionRunnable(Runnable[LanguageModelInput, AIMessage]):
    """A Runnable with the wrapped model's contract (``messages | str -> AIMessage``) that
    answers with N candidates fused or selected. Made by :func:`fusion_of_n` /
    :func:`best_of_n`; ``invoke``, ``ainvoke``, ``batch`` and ``stream`` work as usual.
    :meth:`run` / :meth:`arun` also return the candidates and the decision."""

    def __init__(self, engine: FusionEngine) -> None:
        self.engine = engine
        self.name = "FusionOfN" if engine.strategy == "fusion" else "BestOfN"

    @property
    def InputType(self) -> Any:
        return LanguageModelInput

    @property
    def OutputType(self) -> type[AIMessage]:
        return AIMessage

    def _run(self, value: LanguageModelInput, config: RunnableConfig) -> RunResult:
        conversation = to_messages(value)
        return run_sync(lambda: self.engine.run(value, conversation, config, sync=True))

    async def _arun(self, value: LanguageModelInput, config: RunnableConfig) -> RunResult:
        conversation = to_messages(value)
        return await self.engine.run(value, conversation, config, sync=False)

    def run(self, value: LanguageModelInput, config: RunnableConfig | None = None) -> RunResult:
        """Like ``invoke``, but returns the whole :class:`FusionResult`."""
        run = cast("Any", self._run)
        return cast("RunResult", self._call_with_config(run, value, ensure_config(config)))

    async def arun(
        self, value: LanguageModelInput, config: RunnableConfig | None = None
    ) -> RunResult:
        """Like ``ainvoke``, but returns the whole :class:`FusionResult`."""
        arun = cast("Any", self._arun)
        return cast("RunResult", await self._acall_with_config(arun, value, ensure_config(config)))

    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return self.run(input, config).message

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        """Yield the fusor's chunks as they are generated (BoN, or a fallback: the chosen
        answer as one chunk). The candidates run first, in parallel."""
        items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

        def forward(chunk: Any) -> Any:
            items.put(("chunk", chunk))
            return chunk

        def work() -> None:
            token_sink.set(forward)
            try:
                items.put(("result", self.run(input, config)))
            except BaseException as exc:  # handed to the consumer
                items.put(("error", exc))

        threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True).start()
        streamed = False
        while True:
            kind, value = items.get()
            if kind == "chunk":
                streamed = True
                yield _as_chunk(value)
            elif kind == "error":
                raise value
            else:
                if not streamed:
                    yield _as_chunk(value.message)
                return

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        """Async :meth:`stream`."""
        items: asyncio.Queue[AIMessageChunk] = asyncio.Queue()

        def forward(chunk: Any) -> Any:
            items.put_nowait(_as_chunk(chunk))
            return chunk

        async def work() -> RunResult:
            token_sink.set(forward)
            return await self.arun(input, config)

        task = asyncio.ensure_future(work())
        streamed = False
        while not (task.done() and items.empty()):
            getter = asyncio.ensure_future(items.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                streamed = True
                yield getter.result()
            else:
                getter.cancel()
        result = task.result()
        if not streamed:
            yield _as_chunk(result.message)

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return (await self.arun(input, config)).message


def _as_chunk(value: Any) -> AIMessageChunk:
    if isinstance(value, AIMessageChunk):
        return value
    if isinstance(value, AIMessage):
        return AIMessageChunk(
            content=value.content,
            id=value.id,
            tool_call_chunks=[
                {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
                for i, c in enumerate(value.tool_calls)
            ],
            usage_metadata=value.usage_metadata,
            response_metadata=value.response_metadata,
        )
    return AIMessageChunk(content=str(value))


class FusionNode(Runnable[Any, dict[str, Any]]):
    """A LangGraph node with the wrapped node's contract (``state -> partial update``).

    The update is the wrapped node's own update (the winner's, or for a fusion the first
    successful candidate's), with its last ``AIMessage`` replaced by the final answer.
    """

    def __init__(self, engine: FusionEngine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.__name__ = name

    def _update(self, result: RunResult) -> dict[str, Any]:
        update = dict(result.update or {})
        messages = update.get("messages")
        items = list(messages) if isinstance(messages, Sequence) else [messages]
        for i in range(len(items) - 1, -1, -1):
            if isinstance(items[i], AIMessage):
                items[i] = result.message
                break
        else:
            items = [result.message]
        update["messages"] = items
        return update

    def _run(self, state: Any, config: RunnableConfig) -> dict[str, Any]:
        conversation = state_messages(state)
        result = run_sync(lambda: self.engine.run(state, conversation, config, sync=True))
        return self._update(result)

    async def _arun(self, state: Any, config: RunnableConfig) -> dict[str, Any]:
        conversation = state_messages(state)
        return self._update(await self.engine.run(state, conversation, config, sync=False))

    def invoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        return self._call_with_config(cast("Any", self._run), input, ensure_config(config))

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        arun = cast("Any", self._arun)
        return await self._acall_with_config(arun, input, ensure_config(config))

    def __call__(self, state: Any, config: RunnableConfig | None = None) -> dict[str, Any]:
        """Call it like the node it wraps."""
        return self.invoke(state, config)


def _wrap(engine: FusionEngine, step: Any) -> FusionRunnable | FusionNode:
    if engine.is_node:
        first = step[0] if isinstance(step, list | tuple) else step
        prefix = "fusion_of_n" if engine.strategy == "fusion" else "best_of_n"
        return FusionNode(engine, f"{prefix}({getattr(first, '__name__', 'node')})")
    return FusionRunnable(engine)


def fusion_of_n(
    step: Any,
    *,
    n: int,
    fusor: Runnable[Any, Any],
    critic: Runnable[Any, Any] | None = None,
    min_candidates: int | None = None,
    max_concurrency: int | None = None,
    timeout: float | None = None,
    retry: RetryPolicy | None = None,
    fallback: Selector | Literal["default"] | None = "default",
    seed: int | None = None,
    temperature: float | None = None,
    prompt: PromptTemplate = FUSION_PROMPT,
    critique_prompt: PromptTemplate = CRITIQUE_PROMPT,
) -> FusionRunnable | FusionNode:
    """Fusion-of-N: N candidates in parallel, then a fusor writes one answer from all.

    Args:
        step: What to run N times: a chat model or any Runnable (``messages | str ->
            AIMessage``), or a LangGraph node function (``state[, config] -> update``,
            sync or async). A list makes a pool: candidate ``i`` uses ``step[i % len]``.
        n: How many candidates (1 to 256).
        fusor: The chat model that writes the final answer. Bind it to the same tools as
            the step (``fusor=llm.bind_tools(tools)``) to let it answer with tool calls.
        critic: Optional chat model that critiques each candidate (shown to the fusor).
        min_candidates: Successful candidates needed to go on (default 1); below it,
            :class:`~fusion_graph.errors.NotEnoughCandidatesError` carries every failure.
        max_concurrency: Bound on model calls in flight (default: all N at once).
        timeout: Per-attempt timeout of each call, in seconds.
        retry: Retries with backoff for each call (a LangGraph ``RetryPolicy``); timeouts
            are always retryable. Default: one attempt.
        fallback: Selector used if the fusor still fails; its pick is the answer and the
            decision says ``fallback=True``. Default :class:`MajorityVote`; ``None`` raises
            :class:`~fusion_graph.errors.DecisionError` instead.
        seed: Base sampling seed; candidate ``i`` gets ``seed + i`` on models with a
            ``seed`` field. Default: a random base per run.
        temperature: Sampling temperature for models with a ``temperature`` field.
        prompt: The fusion prompt template.
        critique_prompt: The critique prompt template.

    Returns:
        For a Runnable: a :class:`FusionRunnable` (same input and output). For a node
        function: a :class:`FusionNode` to pass to ``StateGraph.add_node``.

    Example:
        >>> fused = fusion_of_n(llm, n=5, fusor=llm)  # doctest: +SKIP
        >>> fused.invoke("Why is the sky blue?").content  # doctest: +SKIP
    """
    engine = build_engine(
        step,
        n=n,
        strategy="fusion",
        fusor=fusor,
        critic=critic,
        min_candidates=min_candidates,
        max_concurrency=max_concurrency,
        timeout=timeout,
        retry=retry,
        fallback=fallback,
        seed=seed,
        temperature=temperature,
        fusion_prompt=prompt,
        critique_prompt=critique_prompt,
    )
    return _wrap(engine, step)


def best_of_n(
    step: Any,
    *,
    n: int,
    selector: Any,
    critic: Runnable[Any, Any] | None = None,
    min_candidates: int | None = None,
    max_concurrency: int | None = None,
    timeout: float | None = None,
    retry: RetryPolicy | None = None,
    fallback: Selector | Literal["default"] | None = "default",
    seed: int | None = None,
    temperature: float | None = None,
    critique_prompt: PromptTemplate = CRITIQUE_PROMPT,
) -> FusionRunnable | FusionNode:
    """Best-of-N: N candidates in parallel, then a selector picks one, unchanged (tool
    calls included).

    Args:
        step: As for :func:`fusion_of_n`.
        n: How many candidates (1 to 256).
        selector: :class:`LLMJudge`, :class:`PairwiseJudge`, :class:`MajorityVote`, your
            own :class:`Selector`, or a reward function ``(messages, candidate) -> float``
            (sync or async; highest wins).
        critic, min_candidates, max_concurrency, timeout, retry, seed, temperature,
        critique_prompt: As for :func:`fusion_of_n`.
        fallback: Selector used when the selector fails (e.g. a judge that answers
            nonsense for every candidate). Default :class:`MajorityVote`; ``None`` raises.

    Example:
        >>> best = best_of_n(llm, n=5, selector=LLMJudge(judge))  # doctest: +SKIP
    """
    engine = build_engine(
        step,
        n=n,
        strategy="best_of_n",
        selector=selector,
        critic=critic,
        min_candidates=min_candidates,
        max_concurrency=max_concurrency,
        timeout=timeout,
        retry=retry,
        fallback=fallback,
        seed=seed,
        temperature=temperature,
        critique_prompt=critique_prompt,
    )
    return _wrap(engine, step)
