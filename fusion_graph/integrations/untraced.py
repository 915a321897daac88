"""Calling a chat model's ``_generate`` / ``_agenerate`` directly when no callback handler
would see the call.

``BaseChatModel.invoke`` configures a callback manager, reports the start and end of a run,
checks the cache, inspects ``_generate``'s signature and reads the invocation parameters on
every call: about 0.3 ms of CPU that buys nothing when nobody listens. :func:`unobserved`
asks langchain-core itself whether anybody would (``CallbackManager.configure`` with the
call's callbacks, which also adds LangSmith's tracer when tracing is on, the handlers of
configure hooks and debug/verbose printers), and says no also when a cache or a rate limiter
applies or the model streams by default. :func:`finish` then gives the replies what
``BaseChatModel`` would have: the generation info and (for one reply) the result's
``llm_output`` in each ``response_metadata``, and a run-style message id.

When a handler is attached (LangSmith, OpenTelemetry through a LangChain instrumentor,
LangGraph's ``stream_mode="messages"``, ``astream_events``), the caller takes the ordinary
``invoke`` path, so runs nest as they always did.
"""

from __future__ import annotations

import uuid
from typing import Any

from langchain_core.callbacks import CallbackManager
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel
from langchain_core.outputs import ChatResult
from langchain_core.runnables import RunnableConfig

__all__ = ["STRUCTURED_OUTPUT_KEYS", "finish", "unobserved"]

STRUCTURED_OUTPUT_KEYS = ("ls_structured_output_format", "structured_output_format")
"""Call options ``with_structured_output`` adds for tracing only (``BaseChatModel.generate``
drops them before ``_generate``)."""
_GATEWAY_KEY = "lc_gateway_metadata"
"""Generation info ``BaseChatModel`` keeps out of ``response_metadata``."""
_ID_PREFIX = "lc_run-"


def unobserved(model: BaseChatModel, config: RunnableConfig) -> bool:
    """Whether a call of ``model`` with ``config`` would reach no callback handler, no cache
    and no rate limiter, and would not stream: then ``_generate`` can be called directly."""
    if model.rate_limiter is not None or getattr(model, "streaming", False):
        return False
    if model.cache is not False and (model.cache is not None or get_llm_cache() is not None):
        return False
    if getattr(model, "output_version", None) == "v1":
        return False
    manager = CallbackManager.configure(
        config.get("callbacks"), model.callbacks, verbose=model.verbose
    )
    return not manager.handlers


def finish(result: ChatResult) -> ChatResult:
    """``result`` as ``BaseChatModel`` returns it from a run: each reply's
    ``response_metadata`` holds its generation info (and, for a single reply, the result's
    ``llm_output``), and a reply without an id gets a run-style one."""
    run = uuid.uuid4()
    for index, generation in enumerate(result.generations):
        message = generation.message
        info = generation.generation_info or {}
        metadata: dict[str, Any] = {k: v for k, v in info.items() if k != _GATEWAY_KEY}
        metadata.update(message.response_metadata)
        message.response_metadata = metadata
        if message.id is None:
            message.id = f"{_ID_PREFIX}-{run}-{index}"
    if len(result.generations) == 1 and result.llm_output is not None:
        message = result.generations[0].message
        message.response_metadata = {**result.llm_output, **message.response_metadata}
    return result
