"""Fan-out: N candidates in parallel, each optionally critiqued as soon as it is ready.

Candidate ``i`` comes from generator ``i % len(pool)`` with seed ``seed + i``. Every
candidate is an independent task with its own retries, timeout, seed and result; a
failure is recorded on the candidate, never raised. Candidates that one multi-sample model
(:class:`SupportsSampleN`: the embedded llama.cpp model, vLLM, an OpenAI-compatible server
with ``n``) can make together are made in one call. A candidate's critique starts when that
candidate finishes, so a slow candidate never holds back the others' critiques.

:class:`FanOut` is public: the wrappers, the subgraph and the batch jobs all make their
candidates with it.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Awaitable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import set_config_context

from fusion_graph import events
from fusion_graph.errors import NotEnoughCandidatesError
from fusion_graph.events import EventSink
from fusion_graph.hooks import CallInfo, current_hooks
from fusion_graph.messages import as_reply, message_text
from fusion_graph.nodes.critique import critique
from fusion_graph.prompts import CRITIQUE_PROMPT, PromptTemplate
from fusion_graph.runtime import Caller, CallResult, model_fields, model_name, role_config
from fusion_graph.types import Candidate, ErrorInfo, TokenUsage

MAX_CANDIDATES = 256
"""The largest ``n`` accepted. Beyond it, prompts for the fusor or judge outgrow any
context window, and the fan-out is better split into several runs."""


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
            fields = model_fields(target)
            return cls(
                target=target,
                name=model_name(target),
                is_node=False,
                takes_seed="seed" in fields,
                takes_temperature="temperature" in fields,
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

    def sampling(self, *, seed: int | None, temperature: float | None) -> dict[str, Any]:
        """The call options this generator takes for one candidate."""
        options: dict[str, Any] = {}
        if seed is not None and self.takes_seed:
            options["seed"] = seed
        if temperature is not None and self.takes_temperature:
            options["temperature"] = temperature
        return options

    async def make(
        self,
        source: Any,
        config: RunnableConfig,
        caller: Caller,
        *,
        seed: int | None,
        temperature: float | None,
    ) -> CallResult[Any]:
        """One candidate from ``source`` (the wrapped step's input, or the graph state for
        a node), with the caller's policy."""
        if not self.is_node:
            options = self.sampling(seed=seed, temperature=temperature)
            return await caller.call_model(self.target, source, config, **options)
        fn = self.target
        args = (source, config) if self.node_takes_config else (source,)
        if self.node_is_async:

            async def acall() -> Any:
                # The node sees this candidate's config also through the context (for
                # model calls that do not pass `config` on).
                with set_config_context(config) as ctx:
                    return await asyncio.create_task(fn(*args), context=ctx)

            return await caller.call(None, acall)

        def call() -> Any:
            with set_config_context(config) as ctx:
                return ctx.run(fn, *args)

        return await caller.call(call, None)

    def reply(self, result: Any) -> tuple[AIMessage, dict[str, Any] | None]:
        """The candidate's AIMessage (and, for a node, its whole update); raises when the
        result holds no usable reply."""
        if not self.is_node:
            return as_reply(result, who="the step"), None
        if not isinstance(result, Mapping):
            msg = f"node returned {type(result).__name__}, expected a dict update"
            raise TypeError(msg)
        messages = result.get("messages")
        items = messages if isinstance(messages, Sequence) else [messages]
        ai = [m for m in items if isinstance(m, AIMessage)]
        if not ai:
            msg = "node update has no AIMessage under 'messages'"
            raise ValueError(msg)
        return as_reply(ai[-1], who="the node"), dict(result)


def generator_pool(step: Any) -> tuple[Generator, ...]:
    """The generators of ``step``: one, or a list of them (a pool); ``TypeError`` /
    ``ValueError`` for anything else."""
    members = list(step) if isinstance(step, list | tuple) else [step]
    if not members:
        msg = "the generator pool is empty: pass a model, a node function, or a list of them"
        raise ValueError(msg)
    generators = tuple(Generator.of(g) for g in members)
    if len({g.is_node for g in generators}) > 1:
        msg = "a generator pool cannot mix Runnables and node functions"
        raise TypeError(msg)
    return generators


@dataclass(frozen=True, kw_only=True)
class Generated:
    """A candidate plus what is not state: the node's full update and the raw error."""

    candidate: Candidate
    update: dict[str, Any] | None = None
    exception: Exception | None = None


@dataclass(frozen=True, kw_only=True)
class FanOut:
    """Makes the N candidates of a run (see the module docs).

    Example::

        fan_out = FanOut(generators=generator_pool(llm), n=4, seed=0)
        caller = Caller.for_run(sync=False)
        made = await fan_out.generate("Hi", to_messages("Hi"), {}, caller=caller)
        [g.candidate.text for g in made]
    """

    generators: tuple[Generator, ...]
    """The pool: candidate ``i`` comes from ``generators[i % len]``."""
    n: int
    """How many candidates."""
    seed: int | None = None
    """Base seed: candidate ``i`` gets ``seed + i``; ``None`` draws a base per run."""
    temperature: float | None = None
    """Sampling temperature for generators that take one."""
    critic: Runnable[Any, Any] | None = None
    """Critiques each successful candidate when set."""
    critique_prompt: PromptTemplate = CRITIQUE_PROMPT
    """The critic's prompt."""

    @property
    def is_node(self) -> bool:
        return self.generators[0].is_node

    def generator(self, index: int) -> Generator:
        """The generator of candidate ``index``."""
        return self.generators[index % len(self.generators)]

    def seeds(self) -> list[int]:
        """The seed of each candidate of one run (a fresh base when ``seed`` is None)."""
        base = self.seed if self.seed is not None else random.randrange(2**31 - MAX_CANDIDATES)
        return [base + i for i in range(self.n)]

    def groups(self) -> tuple[dict[int, list[int]], list[int]]:
        """Candidates that one multi-sample call can make together (by pool slot), and the
        rest (one call each)."""
        groups: dict[int, list[int]] = {}
        single: list[int] = []
        for index in range(self.n):
            slot = index % len(self.generators)
            if self.generators[slot].samples_n:
                groups.setdefault(slot, []).append(index)
            else:
                single.append(index)
        for slot, indices in list(groups.items()):
            if len(indices) < 2:
                single.extend(groups.pop(slot))
        return groups, sorted(single)

    async def generate(
        self,
        source: Any,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig,
        *,
        caller: Caller,
        emit: EventSink | None = None,
    ) -> list[Generated]:
        """Every candidate (and its critique), concurrently; index order; failures recorded,
        never raised. ``source`` is what each generator is called with (the input, or the
        state for a node); ``conversation`` is what critics and deciders are shown."""
        sink = emit or events.event_sink()
        run = _Run(self, source, conversation, config, caller, sink, self.seeds())
        groups, single = self.groups()
        tasks: list[Awaitable[Generated | list[Generated]]] = [run.one(i) for i in single]
        tasks += [run.group(self.generators[slot], indices) for slot, indices in groups.items()]
        results: list[Generated] = []
        for item in await asyncio.gather(*tasks):
            results.extend(item if isinstance(item, list) else [item])
        return sorted(results, key=lambda g: g.candidate.index)


@dataclass(frozen=True)
class _Run:
    """One run of a :class:`FanOut`."""

    fan_out: FanOut
    source: Any
    conversation: Sequence[BaseMessage]
    config: RunnableConfig
    caller: Caller
    emit: EventSink
    seeds: list[int]

    def _info(self, index: int, name: str) -> CallInfo:
        return CallInfo(
            index=index, model=name, seed=self.seeds[index], temperature=self.fan_out.temperature
        )

    async def one(self, index: int) -> Generated:
        generator = self.fan_out.generator(index)
        seed = self.seeds[index]
        self.emit(events.candidate_started(index, generator.name))
        child = role_config(
            self.config, role="generator", run_name=f"candidate[{index}]", index=index
        )
        with current_hooks().candidate(self._info(index, generator.name)) as done:
            result = await generator.make(
                self.source, child, self.caller, seed=seed, temperature=self.fan_out.temperature
            )
            made = _generated(generator, index, seed, result)
            done(made.candidate)
        return await self._critiqued(made)

    async def group(self, generator: Generator, indices: list[int]) -> list[Generated]:
        model = generator.target
        seeds = [self.seeds[i] for i in indices]
        temperature = self.fan_out.temperature
        kwargs = {"temperature": temperature} if temperature is not None else {}
        messages = list(self.conversation)
        with ExitStack() as stack:
            done = []
            for index in indices:
                self.emit(events.candidate_started(index, generator.name))
                info = self._info(index, generator.name)
                done.append(stack.enter_context(current_hooks().candidate(info)))
            result: CallResult[list[AIMessage | Exception]] = await self.caller.call(
                lambda: model.sample_n(messages, seeds=seeds, **kwargs),
                lambda: model.asample_n(messages, seeds=seeds, **kwargs),
            )
            if result.error is not None:
                # One failed request must not cost every candidate: make them one by one.
                made = await self._one_by_one(generator, indices, result)
            else:
                made = [
                    _generated(generator, index, seed, _sample(result, k))
                    for k, (index, seed) in enumerate(zip(indices, seeds, strict=True))
                ]
            for k, generated in enumerate(made):
                done[k](generated.candidate)
        return list(await asyncio.gather(*(self._critiqued(m) for m in made)))

    async def _one_by_one(
        self, generator: Generator, indices: list[int], failed: CallResult[Any]
    ) -> list[Generated]:
        """The candidates of a failed multi-sample call, each made by a call of its own;
        each records the group's error (``multi_sample_error``), attempts and time."""
        assert failed.error is not None
        group_error = ErrorInfo.of(failed.error)

        async def one(index: int) -> Generated:
            child = role_config(
                self.config, role="generator", run_name=f"candidate[{index}]", index=index
            )
            seed = self.seeds[index]
            alone = await generator.make(
                self.conversation,
                child,
                self.caller,
                seed=seed,
                temperature=self.fan_out.temperature,
            )
            total = CallResult(
                alone.value,
                alone.error,
                failed.attempts + alone.attempts,
                failed.latency_s + alone.latency_s,
            )
            made = _generated(generator, index, seed, total)
            update = {"multi_sample_error": group_error}
            return Generated(
                candidate=made.candidate.model_copy(update=update),
                update=made.update,
                exception=made.exception,
            )

        return list(await asyncio.gather(*(one(i) for i in indices)))

    async def _critiqued(self, made: Generated) -> Generated:
        critic = self.fan_out.critic
        if critic is not None and made.candidate.ok:
            notes = await critique(
                critic,
                self.fan_out.critique_prompt,
                self.conversation,
                made.candidate,
                self.config,
                self.caller,
            )
            made = Generated(
                candidate=made.candidate.model_copy(update={"critiques": [notes]}),
                update=made.update,
            )
        self.emit(events.candidate_finished(made.candidate))
        return made


def _sample(result: CallResult[list[AIMessage | Exception]], k: int) -> CallResult[Any]:
    """Sample ``k`` of a multi-sample call as a call result of its own."""
    if result.error is not None or result.value is None:
        error = result.error or RuntimeError("the multi-sample call returned nothing")
        return CallResult(None, error, result.attempts, result.latency_s)
    value = result.value[k]
    if isinstance(value, Exception):
        return CallResult(None, value, result.attempts, result.latency_s)
    # A backend may say when each sample finished.
    latency = float(value.response_metadata.get("latency_s", result.latency_s))
    return CallResult(value, None, result.attempts, latency)


def _generated(
    generator: Generator, index: int, seed: int | None, result: CallResult[Any]
) -> Generated:
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
            message, update = generator.reply(result.value)
        except (TypeError, ValueError) as exc:
            error = exc
        else:
            candidate = Candidate(
                **base, message=message, text=message_text(message), usage=TokenUsage.of(message)
            )
            return Generated(candidate=candidate, update=update)
    return Generated(candidate=Candidate(**base, error=ErrorInfo.of(error)), exception=error)


def check_quorum(
    candidates: Sequence[Candidate],
    min_candidates: int,
    exceptions: Sequence[Exception | None] = (),
) -> None:
    """Raise :class:`NotEnoughCandidatesError` when fewer than ``min_candidates``
    succeeded; its ``exceptions`` are the original errors where known (``exceptions[i]``
    for candidate ``i``), else rebuilt from the recorded :class:`ErrorInfo`."""
    ok = sum(c.ok for c in candidates)
    if ok >= min_candidates:
        return
    errors: list[Exception] = []
    for i, candidate in enumerate(candidates):
        if candidate.ok:
            continue
        exc = exceptions[i] if i < len(exceptions) else None
        if exc is None:
            detail = str(candidate.error) if candidate.error else "no reply"
            exc = RuntimeError(f"candidate {candidate.index} ({candidate.model}) failed: {detail}")
        errors.append(exc)
    msg = (
        f"{ok} of {len(candidates)} candidates succeeded, fewer than "
        f"min_candidates={min_candidates}"
    )
    raise NotEnoughCandidatesError(msg, errors, candidates=candidates, required=min_candidates)
