"""Fan-out: N candidates in parallel, each optionally critiqued as soon as it is ready.

Every candidate is an independent task with its own retries, timeout, seed and result; a
failure is recorded on the candidate, never raised. A candidate's critique starts when
that candidate finishes, so a slow candidate never holds back the others' critiques.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import set_config_context
from langgraph.constants import TAG_NOSTREAM

from fusion_graph.hooks import CallInfo, current_hooks
from fusion_graph.nodes.calls import Caller, CallResult
from fusion_graph.prompts import PromptTemplate, build_critique_messages, message_text
from fusion_graph.state import Candidate, Critique, ErrorInfo, TokenUsage

EventSink = Callable[[dict[str, Any]], None]
"""Receives progress events (a LangGraph stream writer, or a no-op)."""

ROLE_KEY = "fusion_graph_role"
"""Metadata key naming the role of a model call: generator, critic, fusor or judge."""
INDEX_KEY = "fusion_graph_candidate_index"
"""Metadata key holding the candidate index of a generator or critic call."""


def model_name(target: object) -> str:
    """A readable name for a model, Runnable or function."""
    inner = getattr(target, "bound", target)  # RunnableBinding (bind_tools, bind)
    for attr in ("model_name", "model", "model_id"):
        value = getattr(inner, attr, None)
        if isinstance(value, str) and value:
            return value
    if isinstance(inner, Runnable):
        return inner.get_name()
    return getattr(inner, "__name__", type(inner).__name__)


def _accepts(target: object, field: str) -> bool:
    inner = getattr(target, "bound", target)
    fields = getattr(type(inner), "model_fields", None)
    return isinstance(fields, Mapping) and field in fields


@runtime_checkable
class SupportsSampleN(Protocol):
    """A model that makes several samples of one prompt in one call (the prompt is
    processed once): the embedded llama.cpp model batches them in one context."""

    def sample_n(
        self, messages: Sequence[BaseMessage], *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]: ...

    async def asample_n(
        self, messages: Sequence[BaseMessage], *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]: ...


@dataclass(frozen=True, kw_only=True)
class Generator:
    """One member of the generator pool and how to call it."""

    target: Any
    """A Runnable (chat model, chain) or a LangGraph node function."""
    name: str
    """Recorded as ``Candidate.model``."""
    is_node: bool
    """True for a node function ``(state[, config]) -> update``."""
    node_takes_config: bool = False
    node_is_async: bool = False
    takes_seed: bool = False
    """The model has a ``seed`` field: each candidate gets its own."""
    takes_temperature: bool = False
    """The model has a ``temperature`` field."""
    samples_n: bool = False
    """The model makes several samples in one call (:class:`SupportsSampleN`)."""

    @classmethod
    def of(cls, target: object) -> Generator:
        """Classify ``target``; raise ``TypeError`` when it is neither kind."""
        if isinstance(target, Runnable):
            return cls(
                target=target,
                name=model_name(target),
                is_node=False,
                takes_seed=_accepts(target, "seed"),
                takes_temperature=_accepts(target, "temperature"),
                samples_n=isinstance(target, SupportsSampleN),
            )
        if callable(target):
            params = inspect.signature(target).parameters
            positional = [
                p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            takes_config = "config" in params or len(positional) >= 2
            is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
                getattr(target, "__call__", None)  # noqa: B004
            )
            return cls(
                target=target,
                name=model_name(target),
                is_node=True,
                node_takes_config=takes_config,
                node_is_async=is_async,
            )
        msg = (
            f"expected a chat model, a Runnable or a LangGraph node function, got "
            f"{type(target).__name__}: {target!r}"
        )
        raise TypeError(msg)

    def calls(
        self,
        source: Any,
        config: RunnableConfig,
        *,
        seed: int | None,
        temperature: float | None,
    ) -> tuple[Callable[[], Any] | None, Callable[[], Awaitable[Any]] | None]:
        """The sync and async callables that make one candidate from ``source`` (the
        wrapped step's input, or the graph state for a node)."""
        if self.is_node:
            return self._node_calls(source, config)
        runnable: Runnable[Any, Any] = self.target
        kwargs: dict[str, Any] = {}
        if seed is not None and self.takes_seed:
            kwargs["seed"] = seed
        if temperature is not None and self.takes_temperature:
            kwargs["temperature"] = temperature
        # Call options as invoke kwargs (what `.bind` would do, minus a wrapper per call).
        return (
            lambda: runnable.invoke(source, config, **kwargs),
            lambda: runnable.ainvoke(source, config, **kwargs),
        )

    def _node_calls(
        self, state: Any, config: RunnableConfig
    ) -> tuple[Callable[[], Any] | None, Callable[[], Awaitable[Any]] | None]:
        fn = self.target
        args = (state, config) if self.node_takes_config else (state,)

        if self.node_is_async:

            async def acall() -> Any:
                # The node sees this candidate's config also through the context (for
                # model calls that do not pass `config` on).
                with set_config_context(config) as ctx:
                    return await asyncio.create_task(fn(*args), context=ctx)

            return None, acall

        def call() -> Any:
            with set_config_context(config) as ctx:
                return ctx.run(fn, *args)

        return call, None


def extract_message(generator: Generator, result: Any) -> tuple[AIMessage, dict[str, Any] | None]:
    """The candidate's AIMessage (and, for a node, its whole update); raises when the result
    holds no usable reply."""
    if generator.is_node:
        if not isinstance(result, Mapping):
            msg = f"node returned {type(result).__name__}, expected a dict update"
            raise TypeError(msg)
        messages = result.get("messages")
        items = messages if isinstance(messages, Sequence) else [messages]
        ai = [m for m in items if isinstance(m, AIMessage)]
        if not ai:
            msg = "node update has no AIMessage under 'messages'"
            raise ValueError(msg)
        return _check_reply(ai[-1]), dict(result)
    if isinstance(result, AIMessage):
        return _check_reply(result), None
    if isinstance(result, str):
        return _check_reply(AIMessage(content=result)), None
    if isinstance(result, BaseMessage):
        return _check_reply(AIMessage(content=result.content)), None
    msg = f"step returned {type(result).__name__}, expected an AIMessage or a string"
    raise TypeError(msg)


def _check_reply(message: AIMessage) -> AIMessage:
    if not message_text(message).strip() and not message.tool_calls:
        msg = "the model returned an empty reply (no text, no tool calls)"
        raise ValueError(msg)
    return message


def role_config(
    config: RunnableConfig, *, role: str, run_name: str, index: int | None = None
) -> RunnableConfig:
    """A child config tagged with the call's role (and candidate index), kept out of
    LangGraph's ``messages`` stream so only the final answer streams token by token.

    A shallow copy: this runs once per model call, N at a time, so it stays cheap."""
    child = RunnableConfig(**config)
    child.pop("run_id", None)  # the caller's run id belongs to the caller's run
    child["run_name"] = run_name
    metadata = {**config.get("metadata", {}), ROLE_KEY: role}
    if index is not None:
        metadata[INDEX_KEY] = index
    child["metadata"] = metadata
    child["tags"] = [*config.get("tags", []), TAG_NOSTREAM]
    return child


_SCORE = re.compile(r"score\W{0,3}(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.IGNORECASE)


def parse_critique_score(text: str) -> float | None:
    """The last ``Score: N/10`` in a critique, clamped to 1-10; ``None`` if absent."""
    found = _SCORE.findall(text)
    if not found:
        return None
    return min(10.0, max(1.0, float(found[-1])))


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """A candidate plus what is not state: the node's full update and the raw error."""

    candidate: Candidate
    update: dict[str, Any] | None = None
    exception: Exception | None = None


@dataclass(frozen=True, kw_only=True)
class CandidateJob:
    """Everything needed to generate the candidates of one run."""

    generators: Sequence[Generator]
    n: int
    source: Any
    conversation: Sequence[BaseMessage]
    config: RunnableConfig
    caller: Caller
    emit: EventSink
    seed: int | None
    temperature: float | None
    critic: Runnable[Any, Any] | None
    critique_prompt: PromptTemplate


def _sample_groups(job: CandidateJob) -> tuple[dict[int, list[int]], list[int]]:
    """Candidates that one multi-sample call can make together (by generator), and the rest."""
    groups: dict[int, list[int]] = {}
    single: list[int] = []
    for index in range(job.n):
        slot = index % len(job.generators)
        generator = job.generators[slot]
        if generator.samples_n:
            groups.setdefault(slot, []).append(index)
        else:
            single.append(index)
    for slot, indices in list(groups.items()):
        if len(indices) < 2:
            single.extend(groups.pop(slot))
    return groups, sorted(single)


async def generate_candidates(job: CandidateJob) -> list[Outcome]:
    """Generate (and critique) every candidate concurrently; results in index order.

    Candidates that a multi-sample model (:class:`SupportsSampleN`) can make together are
    made in one call; all others each in a call of their own, all at once."""
    groups, single = _sample_groups(job)
    tasks: list[Awaitable[Outcome | list[Outcome]]] = [_candidate(job, i) for i in single]
    tasks += [
        _sampled_group(job, job.generators[slot], indices) for slot, indices in groups.items()
    ]
    results: list[Outcome] = []
    for item in await asyncio.gather(*tasks):
        results.extend(item if isinstance(item, list) else [item])
    return sorted(results, key=lambda o: o.candidate.index)


async def _sampled_group(
    job: CandidateJob, generator: Generator, indices: list[int]
) -> list[Outcome]:
    model = generator.target
    seeds = [job.seed + i if job.seed is not None else None for i in indices]
    kwargs = {"temperature": job.temperature} if job.temperature is not None else {}
    messages = list(job.conversation)
    with ExitStack() as stack:
        done = []
        for index, seed in zip(indices, seeds, strict=True):
            job.emit({"event": "candidate_started", "index": index, "model": generator.name})
            info = CallInfo(
                index=index, model=generator.name, seed=seed, temperature=job.temperature
            )
            done.append(stack.enter_context(current_hooks().candidate(info)))
        result: CallResult[list[AIMessage | Exception]] = await job.caller.call(
            lambda: model.sample_n(messages, seeds=seeds, **kwargs),
            lambda: model.asample_n(messages, seeds=seeds, **kwargs),
        )
        outcomes = []
        for k, (index, seed) in enumerate(zip(indices, seeds, strict=True)):
            if result.error is not None:
                one: CallResult[Any] = CallResult(
                    None, result.error, result.attempts, result.latency_s
                )
            else:
                assert result.value is not None
                value = result.value[k]
                error = value if isinstance(value, Exception) else None
                latency = result.latency_s  # a backend may say when each sample finished
                if isinstance(value, AIMessage):
                    latency = float(value.response_metadata.get("latency_s", latency))
                one = CallResult(None if error else value, error, result.attempts, latency)
            outcome = _to_outcome(generator, index, seed, one)
            done[k](outcome.candidate)
            outcomes.append(outcome)
    return list(await asyncio.gather(*(_critiqued(job, o) for o in outcomes)))


async def _critiqued(job: CandidateJob, outcome: Outcome) -> Outcome:
    if job.critic is not None and outcome.candidate.ok:
        critique = await _critique(job, outcome.candidate)
        outcome = Outcome(
            candidate=outcome.candidate.model_copy(update={"critiques": [critique]}),
            update=outcome.update,
        )
    job.emit(candidate_event(outcome.candidate))
    return outcome


async def _candidate(job: CandidateJob, index: int) -> Outcome:
    generator = job.generators[index % len(job.generators)]
    seed = job.seed + index if job.seed is not None else None
    job.emit({"event": "candidate_started", "index": index, "model": generator.name})
    config = role_config(job.config, role="generator", run_name=f"candidate[{index}]", index=index)
    sync_fn, async_fn = generator.calls(job.source, config, seed=seed, temperature=job.temperature)
    info = CallInfo(index=index, model=generator.name, seed=seed, temperature=job.temperature)
    with current_hooks().candidate(info) as done:
        result: CallResult[Any] = await job.caller.call(sync_fn, async_fn)
        outcome = _to_outcome(generator, index, seed, result)
        done(outcome.candidate)
    return await _critiqued(job, outcome)


def _to_outcome(
    generator: Generator, index: int, seed: int | None, result: CallResult[Any]
) -> Outcome:
    base = {
        "index": index,
        "model": generator.name,
        "latency_s": result.latency_s,
        "attempts": result.attempts,
        "seed": seed,
    }
    error = result.error
    if error is None:
        try:
            message, update = extract_message(generator, result.value)
        except (TypeError, ValueError) as exc:
            error = exc
        else:
            candidate = Candidate(
                **base, message=message, text=message_text(message), usage=TokenUsage.of(message)
            )
            return Outcome(candidate=candidate, update=update)
    return Outcome(candidate=Candidate(**base, error=ErrorInfo.of(error)), exception=error)


async def _critique(job: CandidateJob, candidate: Candidate) -> Critique:
    critic = job.critic
    assert critic is not None
    messages = build_critique_messages(job.critique_prompt, job.conversation, candidate)
    config = role_config(
        job.config, role="critic", run_name=f"critique[{candidate.index}]", index=candidate.index
    )
    name = model_name(critic)
    with current_hooks().critique(CallInfo(index=candidate.index, model=name)) as done:
        result = await job.caller.call(
            lambda: critic.invoke(messages, config), lambda: critic.ainvoke(messages, config)
        )
        critique = _to_critique(name, result)
        done(critique)
    return critique


def _to_critique(name: str, result: CallResult[Any]) -> Critique:
    if result.error is not None:
        return Critique(model=name, error=ErrorInfo.of(result.error), latency_s=result.latency_s)
    reply = result.value
    text = message_text(reply) if isinstance(reply, BaseMessage) else str(reply)
    return Critique(
        model=name,
        text=text,
        score=parse_critique_score(text),
        usage=TokenUsage.of(reply) if isinstance(reply, AIMessage) else None,
        latency_s=result.latency_s,
    )


def candidate_event(candidate: Candidate) -> dict[str, Any]:
    """The ``candidate_finished`` progress event for a candidate."""
    usage = candidate.usage
    return {
        "event": "candidate_finished",
        "index": candidate.index,
        "model": candidate.model,
        "ok": candidate.ok,
        "latency_s": round(candidate.latency_s, 4),
        "output_tokens": usage.output_tokens if usage else None,
        "error": candidate.error.model_dump() if candidate.error else None,
        "critique_score": next((c.score for c in candidate.critiques if c.score is not None), None),
    }
