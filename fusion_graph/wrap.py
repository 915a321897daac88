"""``fusion_of_n`` and ``best_of_n``: wrap a model, any Runnable, or a LangGraph node so
that one call becomes N parallel candidates and one fused or selected answer."""

from __future__ import annotations

import asyncio
import contextvars
import json
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, TypedDict, Unpack, cast, overload

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.prompts import BasePromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config
from langgraph.types import RetryPolicy

from fusion_graph.events import EventSink
from fusion_graph.messages import state_messages, to_messages
from fusion_graph.nodes.decide import Selector
from fusion_graph.nodes.select import RewardFn
from fusion_graph.options import FusionOptions
from fusion_graph.prompts import FUSION_PROMPT, PromptTemplate
from fusion_graph.runtime import run_sync
from fusion_graph.step import FusionStep
from fusion_graph.types import FusionResult

NodeFunction = Callable[..., Any]
"""A LangGraph node function: ``(state[, config]) -> update``, sync or async."""


class StepOptions(TypedDict, total=False):
    """The keyword options every shell takes besides ``n`` and the decider; each is
    documented on :class:`~fusion_graph.options.FusionOptions`."""

    critic: Runnable[Any, Any] | None
    critique_prompt: PromptTemplate
    min_candidates: int
    max_concurrency: int | None
    timeout: float | None
    retry: RetryPolicy | None
    fallback: Selector | None
    seed: int | None
    temperature: float | None


class FusionRunnable(Runnable[LanguageModelInput, AIMessage]):
    """A Runnable with the wrapped model's contract (``messages | str -> AIMessage``) that
    answers with N candidates fused or selected. Made by :func:`fusion_of_n` /
    :func:`best_of_n`; ``invoke``, ``ainvoke``, ``batch`` and ``stream`` work as usual.
    :meth:`run` / :meth:`arun` also return the candidates and the decision."""

    def __init__(self, step: FusionStep) -> None:
        self.step = step
        self.name = "FusionOfN" if step.options.strategy == "fusion" else "BestOfN"

    @property
    def InputType(self) -> Any:
        return LanguageModelInput

    @property
    def OutputType(self) -> type[AIMessage]:
        return AIMessage

    def run(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        on_event: EventSink | None = None,
        on_token: Callable[[AIMessageChunk], Any] | None = None,
    ) -> FusionResult:
        """Like ``invoke``, but returns the whole :class:`~fusion_graph.FusionResult`.

        Args:
            input: A string, messages or a prompt value.
            config: The usual ``RunnableConfig`` (callbacks, tags, metadata).
            on_event: Receives the run's progress events (:mod:`fusion_graph.events`).
            on_token: Receives the fused answer's chunks as the fusor streams them.
        """

        def run(value: LanguageModelInput, config: RunnableConfig) -> FusionResult:
            conversation = self.conversation(value)
            return run_sync(
                lambda: self.step.run(
                    value, conversation, config, sync=True, on_event=on_event, on_token=on_token
                )
            )

        call = cast("Any", run)
        return cast("FusionResult", self._call_with_config(call, input, ensure_config(config)))

    async def arun(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        on_event: EventSink | None = None,
        on_token: Callable[[AIMessageChunk], Any] | None = None,
    ) -> FusionResult:
        """Async :meth:`run`."""

        async def arun(value: LanguageModelInput, config: RunnableConfig) -> FusionResult:
            conversation = self.conversation(value)
            return await self.step.run(
                value, conversation, config, sync=False, on_event=on_event, on_token=on_token
            )

        result = await self._acall_with_config(cast("Any", arun), input, ensure_config(config))
        return cast("FusionResult", result)

    def conversation(self, value: Any) -> list[BaseMessage]:
        """The conversation in an input: a string, messages or a prompt value; for a chain
        that starts with a prompt template (``prompt | llm``), that prompt's variables."""
        if not isinstance(value, Mapping):
            return to_messages(value)
        prompt = _leading_prompt(self.step.fan_out.generators[0].target)
        if prompt is not None:
            return to_messages(prompt.invoke(dict(value)))
        msg = (
            f"got a dict (keys: {', '.join(map(str, value)) or 'none'}) as input. A wrapped "
            "model takes a string, messages or a prompt value; a chain that starts with a "
            "prompt template (prompt | llm) takes that prompt's variables. To wrap a LangGraph "
            "node, pass the node function itself, fusion_of_n(node_fn, ...), not "
            "RunnableLambda(node_fn)."
        )
        raise TypeError(msg)

    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return self.run(input, config).message

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return (await self.arun(input, config)).message

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        """Yield the fusor's chunks as they are generated (BoN, or a fallback: the chosen
        answer as one chunk). The candidates run first, in parallel."""
        items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

        def work() -> None:
            try:
                result = self.run(input, config, on_token=lambda c: items.put(("chunk", c)))
                items.put(("result", result))
            except BaseException as exc:  # handed to the consumer
                items.put(("error", exc))

        threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True).start()
        streamed = False
        while True:
            kind, value = items.get()
            if kind == "chunk":
                streamed = True
                yield value
            elif kind == "error":
                raise value
            else:
                if not streamed:
                    yield as_chunk(value.message)
                return

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        """Async :meth:`stream`."""
        items: asyncio.Queue[AIMessageChunk] = asyncio.Queue()
        task = asyncio.ensure_future(self.arun(input, config, on_token=items.put_nowait))
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
            yield as_chunk(result.message)


def _leading_prompt(step: object) -> BasePromptTemplate[Any] | None:
    """The prompt template a chain starts with (``prompt | llm``), if it starts with one."""
    first = getattr(step, "first", None)
    return first if isinstance(first, BasePromptTemplate) else None


def as_chunk(message: AIMessage) -> AIMessageChunk:
    """A whole message as one chunk (tool calls as tool-call chunks)."""
    return AIMessageChunk(
        content=message.content,
        id=message.id,
        tool_call_chunks=[
            {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
            for i, c in enumerate(message.tool_calls)
        ],
        usage_metadata=message.usage_metadata,
        response_metadata=message.response_metadata,
    )


class FusionNode(Runnable[Any, dict[str, Any]]):
    """A LangGraph node with the wrapped node's contract (``state -> partial update``).

    The update is the wrapped node's own update (the winner's, or for a fusion the first
    successful candidate's), with its last ``AIMessage`` replaced by the final answer.
    """

    def __init__(self, step: FusionStep, name: str) -> None:
        self.step = step
        self.name = name
        self.__name__ = name

    def _update(self, result: FusionResult) -> dict[str, Any]:
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
        result = run_sync(lambda: self.step.run(state, conversation, config, sync=True))
        return self._update(result)

    async def _arun(self, state: Any, config: RunnableConfig) -> dict[str, Any]:
        conversation = state_messages(state)
        return self._update(await self.step.run(state, conversation, config, sync=False))

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


def wrap_step(step: Any, options: FusionOptions) -> FusionRunnable | FusionNode:
    """The Runnable or node shell around ``step`` (a model, a node, or a pool)."""
    built = FusionStep.build(step, options)
    if not built.is_node:
        return FusionRunnable(built)
    first = step[0] if isinstance(step, list | tuple) else step
    prefix = "fusion_of_n" if options.strategy == "fusion" else "best_of_n"
    return FusionNode(built, f"{prefix}({getattr(first, '__name__', 'node')})")


@overload
def fusion_of_n(
    step: Runnable[Any, Any] | Sequence[Runnable[Any, Any]],
    *,
    n: int,
    fusor: Runnable[Any, Any],
    prompt: PromptTemplate = ...,
    **options: Unpack[StepOptions],
) -> FusionRunnable: ...
@overload
def fusion_of_n(
    step: NodeFunction | Sequence[NodeFunction],
    *,
    n: int,
    fusor: Runnable[Any, Any],
    prompt: PromptTemplate = ...,
    **options: Unpack[StepOptions],
) -> FusionNode: ...
def fusion_of_n(
    step: Any,
    *,
    n: int,
    fusor: Runnable[Any, Any],
    prompt: PromptTemplate = FUSION_PROMPT,
    **options: Unpack[StepOptions],
) -> FusionRunnable | FusionNode:
    """Fusion-of-N: N candidates in parallel, then a fusor writes one answer from all.

    Args:
        step: What to run N times: a chat model or any Runnable (``messages | str ->
            AIMessage``), or a LangGraph node function (``state[, config] -> update``,
            sync or async). A list makes a pool: candidate ``i`` uses ``step[i % len]``.
        n: How many candidates (1 to 256).
        fusor: The chat model that writes the final answer. Bind it to the same tools as
            the step (``fusor=llm.bind_tools(tools)``) to let it answer with tool calls.
        prompt: The fusion prompt template.
        **options: ``critic``, ``critique_prompt``, ``min_candidates``,
            ``max_concurrency``, ``timeout``, ``retry``, ``fallback``, ``seed``,
            ``temperature``: see :class:`~fusion_graph.options.FusionOptions`.

    Returns:
        For a Runnable: a :class:`FusionRunnable` (same input and output). For a node
        function: a :class:`FusionNode` to pass to ``StateGraph.add_node``.

    Example:
        >>> fused = fusion_of_n(llm, n=5, fusor=llm)  # doctest: +SKIP
        >>> fused.invoke("Why is the sky blue?").content  # doctest: +SKIP
    """
    built = FusionOptions(n=n, strategy="fusion", fusor=fusor, prompt=prompt, **options)
    return wrap_step(step, built)


@overload
def best_of_n(
    step: Runnable[Any, Any] | Sequence[Runnable[Any, Any]],
    *,
    n: int,
    selector: Selector | RewardFn,
    **options: Unpack[StepOptions],
) -> FusionRunnable: ...
@overload
def best_of_n(
    step: NodeFunction | Sequence[NodeFunction],
    *,
    n: int,
    selector: Selector | RewardFn,
    **options: Unpack[StepOptions],
) -> FusionNode: ...
def best_of_n(
    step: Any,
    *,
    n: int,
    selector: Selector | RewardFn,
    **options: Unpack[StepOptions],
) -> FusionRunnable | FusionNode:
    """Best-of-N: N candidates in parallel, then a selector picks one, unchanged (tool
    calls included).

    Args:
        step: As for :func:`fusion_of_n`.
        n: How many candidates (1 to 256).
        selector: :class:`~fusion_graph.LLMJudge`, :class:`~fusion_graph.PairwiseJudge`,
            :class:`~fusion_graph.MajorityVote`, your own
            :class:`~fusion_graph.Selector`, or a reward function ``(messages,
            candidate) -> float`` (sync or async; highest wins).
        **options: As for :func:`fusion_of_n`; ``fallback`` decides when the selector
            fails (e.g. a judge that answers nonsense for every candidate).

    Example:
        >>> best = best_of_n(llm, n=5, selector=LLMJudge(judge))  # doctest: +SKIP
    """
    built = FusionOptions(n=n, strategy="best_of_n", selector=selector, **options)
    return wrap_step(step, built)
