"""A generator: one member of the pool (a chat model, any Runnable, or a LangGraph node
function), classified once when the step is built, and how to make one candidate with it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import set_config_context

from fusion_graph.messages import as_reply
from fusion_graph.runtime import Caller, CallResult, model_fields, model_name


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
