"""A generator: one member of the pool (a chat model, any Runnable, or a LangGraph node
function), classified once when the step is built, and how to make one candidate with it.

Node functions take what LangGraph itself would give them: ``(state)``, ``(state, config)``,
``(state, *, runtime)``, ``(state, runtime: Runtime[Ctx])``, and the other names LangGraph
injects (``writer``, ``store``, ``previous``), sync or async; each candidate gets its own
config (tagged with its role and index) and the run's :class:`~langgraph.runtime.Runtime`.
A node may return a dict update or a ``Command`` (its ``update`` holds the reply).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import set_config_context
from langgraph.runtime import Runtime, get_runtime
from langgraph.types import Command

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
    """The node takes the config as its second positional argument."""
    node_kwargs: tuple[str, ...] = ()
    """What LangGraph would inject by keyword: ``config``, ``runtime``, ``writer``,
    ``store``, ``previous``."""
    node_is_async: bool = False
    takes_seed: bool = False
    """The model has a ``seed`` field: each candidate gets its own."""
    takes_temperature: bool = False
    """The model has a ``temperature`` field."""
    takes_timeout: bool = False
    """The model takes a per-request ``timeout`` (e.g. ``ChatOpenAI``'s ``request_timeout``):
    a step's ``timeout=`` is passed down, so a timed-out HTTP request really ends, also on a
    worker thread."""
    model_temperature: float | None = None
    """The temperature the model samples at when a run sets none (its field, or a
    ``.bind(temperature=...)``), recorded in traces."""
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
                takes_timeout="request_timeout" in fields,
                model_temperature=_own_temperature(target),
                samples_n=isinstance(target, SupportsSampleN),
            )
        if callable(target):
            takes_config, kwargs = _node_signature(target)
            is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
                getattr(target, "__call__", None)  # noqa: B004
            )
            return cls(
                target=target,
                name=model_name(target),
                is_node=True,
                node_takes_config=takes_config,
                node_kwargs=kwargs,
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
            if caller.timeout is not None and self.takes_timeout:
                options["timeout"] = caller.timeout
            return await caller.call_model(self.target, source, config, **options)
        fn = self.target
        args = (source, config) if self.node_takes_config else (source,)
        if self.node_is_async:

            async def acall() -> Any:
                # The node sees this candidate's config also through the context (for
                # model calls that do not pass `config` on, and for interrupt()).
                with set_config_context(config) as ctx:
                    kwargs = ctx.run(self._injected, config)
                    return await asyncio.create_task(fn(*args, **kwargs), context=ctx)

            return await caller.call(None, acall)

        def call() -> Any:
            with set_config_context(config) as ctx:
                return ctx.run(lambda: fn(*args, **self._injected(config)))

        return await caller.call(call, None)

    def _injected(self, config: RunnableConfig) -> dict[str, Any]:
        """The keyword arguments LangGraph would give this node (run in its context)."""
        if not self.node_kwargs:
            return {}
        runtime: Runtime[Any] = get_runtime() or Runtime()  # outside a graph: an empty one
        values = {
            "config": config,
            "runtime": runtime,
            "writer": runtime.stream_writer,
            "store": runtime.store,
            "previous": runtime.previous,
        }
        return {name: values[name] for name in self.node_kwargs}

    def reply(self, result: Any) -> tuple[AIMessage, dict[str, Any] | None]:
        """The candidate's AIMessage (and, for a node, its whole update); raises when the
        result holds no usable reply."""
        if not self.is_node:
            return as_reply(result, who="the step"), None
        command = result if isinstance(result, Command) else None
        if command is not None:
            result = command.update if command.update is not None else {}
        if not isinstance(result, Mapping):
            msg = f"node returned {type(result).__name__}, expected a dict update or a Command"
            raise TypeError(msg)
        messages = result.get("messages")
        items = messages if isinstance(messages, Sequence) else [messages]
        ai = [m for m in items if isinstance(m, AIMessage)]
        if not ai:
            msg = "node update has no AIMessage under 'messages'"
            raise ValueError(msg)
        update = dict(result)
        if command is not None:
            update[COMMAND_KEY] = command
        return as_reply(ai[-1], who="the node"), update


COMMAND_KEY = "__fusion_graph_command__"
"""In a node candidate's update: the ``Command`` the node returned (its ``update`` is the
rest of the update); the wrapped node returns the winner's Command with the answer."""

_INJECTABLE = ("config", "runtime", "writer", "store", "previous")
"""The keyword arguments LangGraph injects into a node by name."""


def _node_signature(fn: Callable[..., Any]) -> tuple[bool, tuple[str, ...]]:
    """How to call a node: (config as 2nd positional argument, names to pass by keyword).

    As LangGraph does, ``config``, ``runtime``, ``writer``, ``store`` and ``previous`` are
    passed by keyword when the node names them (positional-or-keyword or keyword-only);
    a second positional parameter with another name and no default gets the config (a
    ``(state, cfg)`` node)."""
    params = list(inspect.signature(fn).parameters.values())
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    rest = params[1:]  # the first parameter is the state
    named = tuple(p.name for p in rest if p.name in _INJECTABLE and p.kind in kinds)
    positional = [
        p
        for p in rest
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in named
    ]
    takes_config = bool(positional) and positional[0].default is inspect.Parameter.empty
    if takes_config and params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        takes_config = False
    return takes_config, named


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


def _own_temperature(target: object) -> float | None:
    bound = getattr(target, "kwargs", None)  # RunnableBinding: .bind(temperature=...)
    if isinstance(bound, Mapping) and isinstance(bound.get("temperature"), int | float):
        return float(bound["temperature"])
    inner = getattr(target, "bound", target)
    value = getattr(inner, "temperature", None)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
