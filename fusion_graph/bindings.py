"""A wrapped model as a full chat-model citizen: tools, structured output and call options
reach every candidate (and the fusor), so a :class:`~fusion_graph.FusionRunnable` drops
into any agent constructor (``create_react_agent``, ``create_agent``) in place of a model.

* ``bind_tools(tools)``: every generator is bound to the tools; for FusioN the fusor too
  (it may answer with tool calls of its own); BoN returns the winner's calls untouched.
* ``with_structured_output(schema)``: the schema becomes a tool every candidate must call
  (``tool_choice`` = the schema's name); the decision (the fusor's own call, or the chosen
  candidate's) is parsed into the schema.
* call options (``invoke(..., stop=[...])``, ``.bind(stop=...)``, ``max_tokens``, ...) are
  bound on every generator and on the fusor; judges and critics keep their own options.
  ``seed`` and ``temperature`` become the step's options: candidate ``i`` gets ``seed + i``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any

from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel

from fusion_graph.options import FusionOptions
from fusion_graph.runtime import model_name
from fusion_graph.step import FusionStep

Rebind = Callable[[Runnable[Any, Any], str], Runnable[Any, Any]]
"""Makes the bound version of one model; the string says what it is (for errors)."""

SAMPLING_OPTIONS = ("seed", "temperature")
"""Call options that become the step's own options (per-candidate seeds)."""


def rebound(step: FusionStep, bind: Rebind, *, fusor: bool) -> FusionStep:
    """``step`` with every generator (and, for FusioN when ``fusor``, the fusor) rebound."""
    generators = step.fan_out.generators
    if generators[0].is_node:
        msg = "a wrapped node has no model to bind: bind the model inside the node instead"
        raise TypeError(msg)
    targets = [bind(g.target, f"the generator {g.name!r}") for g in generators]
    options = step.options
    if fusor and options.fusor is not None:
        options = dataclasses.replace(options, fusor=bind(options.fusor, "the fusor"))
    return FusionStep.build(targets if len(targets) > 1 else targets[0], options)


def tools_binder(tools: Sequence[Any], kwargs: Mapping[str, Any]) -> Rebind:
    """Binds ``tools`` (and ``bind_tools`` options such as ``tool_choice``) to a model."""

    def bind(model: Runnable[Any, Any], what: str) -> Runnable[Any, Any]:
        method = getattr(model, "bind_tools", None)
        if method is None:
            msg = (
                f"{what} ({model_name(model)}) has no bind_tools, so the wrapped model cannot "
                "call tools; wrap a chat model that supports tool calling"
            )
            raise TypeError(msg)
        try:
            bound: Runnable[Any, Any] = method(tools, **kwargs)
        except NotImplementedError as exc:
            msg = f"{what} ({model_name(model)}) does not support tool calling: {exc}"
            raise NotImplementedError(msg) from exc
        return bound

    return bind


def options_binder(kwargs: Mapping[str, Any]) -> Rebind:
    """Binds call options (``stop``, ``max_tokens``, ...) to a model."""

    def bind(model: Runnable[Any, Any], what: str) -> Runnable[Any, Any]:
        return model.bind(**kwargs)

    return bind


def with_sampling(options: FusionOptions, kwargs: dict[str, Any]) -> FusionOptions:
    """``options`` with a ``seed`` / ``temperature`` call option taken from ``kwargs``."""
    taken = {k: kwargs.pop(k) for k in SAMPLING_OPTIONS if k in kwargs}
    return dataclasses.replace(options, **taken) if taken else options


def structured(
    bound_to_schema: Runnable[Any, Any], schema: Any, *, include_raw: bool
) -> Runnable[Any, Any]:
    """The structured-output chain over a step bound to the schema's tool."""
    name = schema_tool_name(schema)
    parser: Runnable[Any, Any]
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        parser = PydanticToolsParser(tools=[schema], first_tool_only=True)
    else:
        parser = JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
    if not include_raw:
        return bound_to_schema | parser
    parsed = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
    )
    return RunnableMap(raw=bound_to_schema) | parsed


def schema_tool_name(schema: Any) -> str:
    """The tool name a structured-output schema is called as."""
    name = convert_to_openai_tool(schema)["function"]["name"]
    assert isinstance(name, str)
    return name
