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
from langgraph.pregel import Pregel
from langgraph.types import RetryPolicy

from fusion_graph.bindings import (
    options_binder,
    rebound,
    schema_tool_name,
    structured,
    tools_binder,
    with_sampling,
)
from fusion_graph.budget import CostFn
from fusion_graph.events import EventSink
from fusion_graph.messages import ChatContract, to_messages
from fusion_graph.node import FusionNode
from fusion_graph.nodes.decide import Selector
from fusion_graph.nodes.select import RewardFn
from fusion_graph.options import FusionOptions
from fusion_graph.prompts import FUSION_PROMPT, PromptTemplate
from fusion_graph.runtime import run_sync
from fusion_graph.step import FusionStep
from fusion_graph.types import FusionResult

__all__ = ["FusionNode", "FusionRunnable", "StepOptions", "best_of_n", "fusion_of_n"]

NodeFunction = Callable[..., Any]
"""A LangGraph node function: ``(state)``, ``(state, config)``, ``(state, *, runtime)``,
``(state, runtime: Runtime[Ctx])`` ... -> update or ``Command``, sync or async."""


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
    grace: float | None
    max_total_tokens: float | None
    cost: CostFn | None


class FusionRunnable(ChatContract, Runnable[LanguageModelInput, AIMessage]):
    """A Runnable with the wrapped model's contract (``messages | str -> AIMessage``) that
    answers with N candidates fused or selected. Made by :func:`fusion_of_n` /
    :func:`best_of_n`; ``invoke``, ``ainvoke``, ``batch`` and ``stream`` work as usual.
    :meth:`run` / :meth:`arun` also return the candidates and the decision."""

    def __init__(self, step: FusionStep) -> None:
        self.step = step
        self.name = "FusionOfN" if step.options.strategy == "fusion" else "BestOfN"

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
        """One fused or selected answer; call options in ``kwargs`` (``stop=...``) reach
        every candidate call and the fusor (see :meth:`bind`)."""
        return self.bind(**kwargs).run(input, config).message

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return (await self.bind(**kwargs).arun(input, config)).message

    def bind(self, **kwargs: Any) -> FusionRunnable:
        """The same step with call options bound on every generator and on the fusor (the
        judges and critic keep theirs); ``seed`` and ``temperature`` become the step's own
        options (candidate ``i`` gets ``seed + i``). A wrapped model, not a
        ``RunnableBinding``, so ``bind_tools`` and ``run`` still work on the result."""
        if not kwargs:
            return self
        rest = dict(kwargs)
        options = with_sampling(self.step.options, rest)
        step = self.step
        if options is not step.options:
            step = FusionStep.build([g.target for g in step.fan_out.generators], options)
        if rest:
            step = rebound(step, options_binder(rest), fusor=True)
        return FusionRunnable(step)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> FusionRunnable:
        """The same step with every generator bound to ``tools`` (``bind_tools(tools,
        **kwargs)``) and, for FusioN, the fusor too, so the fused answer may call them (BoN
        returns the winner's calls untouched). fusion-graph never runs a tool: the agent's
        tool node runs the answer's calls once."""
        fuse = self.step.options.strategy == "fusion"
        return FusionRunnable(rebound(self.step, tools_binder(tools, kwargs), fusor=fuse))

    def with_structured_output(
        self, schema: Any, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable[LanguageModelInput, Any]:
        """Answers parsed into ``schema`` (a pydantic class, TypedDict or JSON schema).

        The schema is a tool every candidate is made to call (``tool_choice`` is its name),
        so the candidates produce the schema; the fusor emits it (fusion) or the winner's
        call is used (BoN), and that call is parsed. ``include_raw=True`` returns
        ``{"raw": AIMessage, "parsed": ..., "parsing_error": None}``."""
        if kwargs:
            msg = (
                f"with_structured_output on a wrapped model takes schema and include_raw only, "
                f"not {', '.join(sorted(kwargs))} (the schema is always called as a tool)"
            )
            raise TypeError(msg)
        bound = self.bind_tools([schema], tool_choice=schema_tool_name(schema))
        return structured(bound, schema, include_raw=include_raw)

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        """Yield the fusor's chunks as they are generated (BoN, or a fallback: the chosen
        answer as one chunk). The candidates run first, in parallel."""
        if kwargs:
            yield from self.bind(**kwargs).stream(input, config)
            return
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
        if kwargs:
            async for chunk in self.bind(**kwargs).astream(input, config):
                yield chunk
            return
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


def wrap_step(
    step: Any,
    options: FusionOptions,
    *,
    candidates_key: str | None = None,
    decision_key: str | None = None,
) -> FusionRunnable | FusionNode:
    """The Runnable or node shell around ``step`` (a model, a node, or a pool)."""
    members = step if isinstance(step, list | tuple) else [step]
    if any(isinstance(m, Pregel) for m in members):
        msg = (
            "fusion_of_n / best_of_n got a compiled LangGraph graph (a whole agent). Each "
            "candidate would be a full agent run executing its own tools, N times over; that is "
            "not supported. Wrap the agent's model step instead: create_agent(model, tools, "
            "middleware=[FusionMiddleware(n=4, fusor=model)]) (fusion_graph.middleware), "
            "create_agent(fusion_of_n(model, n=4, fusor=model), tools), or, in your own "
            "graph, fusion_of_n(call_model_node, ...)."
        )
        raise TypeError(msg)
    built = FusionStep.build(step, options)
    if not built.is_node:
        if candidates_key is not None or decision_key is not None:
            msg = (
                "candidates_key / decision_key are for a wrapped node (they name state keys); "
                "a wrapped model returns an AIMessage: use .run(...) for the candidates"
            )
            raise ValueError(msg)
        return FusionRunnable(built)
    prefix = "fusion_of_n" if options.strategy == "fusion" else "best_of_n"
    name = f"{prefix}({getattr(members[0], '__name__', 'node')})"
    return FusionNode(built, name, candidates_key=candidates_key, decision_key=decision_key)


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
    candidates_key: str | None = ...,
    decision_key: str | None = ...,
    **options: Unpack[StepOptions],
) -> FusionNode: ...
def fusion_of_n(
    step: Any,
    *,
    n: int,
    fusor: Runnable[Any, Any],
    prompt: PromptTemplate = FUSION_PROMPT,
    candidates_key: str | None = None,
    decision_key: str | None = None,
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
        candidates_key: A wrapped node only: also write the candidates
            (``list[Candidate]``) to this state key (declare it in your state). Off by
            default.
        decision_key: A wrapped node only: also write the ``Decision`` to this state key.
        **options: ``critic``, ``critique_prompt``, ``min_candidates``,
            ``max_concurrency``, ``timeout``, ``retry``, ``fallback``, ``seed``,
            ``temperature``, ``grace``, ``max_total_tokens``, ``cost``: see
            :class:`~fusion_graph.options.FusionOptions`.

    Returns:
        For a Runnable: a :class:`FusionRunnable` (same input and output; it has
        ``bind_tools``, ``with_structured_output`` and ``bind``, so it drops into
        ``create_agent`` / ``create_react_agent`` as the model). For a node function: a
        :class:`FusionNode` to pass to ``StateGraph.add_node``. A compiled graph (a whole
        agent) is refused with what to wrap instead.

    Example:
        >>> fused = fusion_of_n(llm, n=5, fusor=llm)  # doctest: +SKIP
        >>> fused.invoke("Why is the sky blue?").content  # doctest: +SKIP
    """
    built = FusionOptions(n=n, strategy="fusion", fusor=fusor, prompt=prompt, **options)
    return wrap_step(step, built, candidates_key=candidates_key, decision_key=decision_key)


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
    candidates_key: str | None = ...,
    decision_key: str | None = ...,
    **options: Unpack[StepOptions],
) -> FusionNode: ...
def best_of_n(
    step: Any,
    *,
    n: int,
    selector: Selector | RewardFn,
    candidates_key: str | None = None,
    decision_key: str | None = None,
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
        candidates_key, decision_key: As for :func:`fusion_of_n`.

    Example:
        >>> best = best_of_n(llm, n=5, selector=LLMJudge(judge))  # doctest: +SKIP
    """
    built = FusionOptions(n=n, strategy="best_of_n", selector=selector, **options)
    return wrap_step(step, built, candidates_key=candidates_key, decision_key=decision_key)
