"""Any OpenAI-compatible server (vLLM, llama.cpp's server, hosted APIs) as a generator, critic,
fusor or judge, with backend-aware fan-out.

Install with ``pip install 'fusion-graph[openai]'``.

Fan-out
    :class:`ChatOpenAICompatible` asks for the N candidates of a fan-out in one request with
    ``n=k``, and falls back to separate concurrent requests for servers that ignore or reject
    ``n`` (:mod:`~fusion_graph.integrations.openai_fanout`: ``supports_n`` and
    ``supports_seed``).

Concurrency
    Every request to one endpoint (base URL) from this process, sync or async, from any number
    of model objects, holds one slot of that endpoint's
    :class:`~fusion_graph.integrations.endpoint_limits.EndpointLimiter` while it runs, so a
    fan-out of 64 candidates against a small server keeps at most ``max_concurrency`` requests
    in flight. When several models name different limits for one endpoint, the smallest wins.
    ``EndpointLimiter`` and ``endpoint_limiter`` are re-exported here.

Example:
    >>> from fusion_graph import fusion_of_n
    >>> from fusion_graph.integrations.openai_compat import openai_compatible
    >>> llm = openai_compatible(
    ...     "http://127.0.0.1:8000/v1", "SmolLM2", max_concurrency=4, max_tokens=128
    ... )
    >>> fused = fusion_of_n(llm, n=8, fusor=llm)  # 8 candidates: one request with n=8
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal
from urllib.parse import urlsplit

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import Field

from fusion_graph.integrations.endpoint_limits import (
    DEFAULT_MAX_CONCURRENCY as DEFAULT_MAX_CONCURRENCY,  # re-exported: it used to live here
)
from fusion_graph.integrations.endpoint_limits import (
    EndpointLimiter,
    endpoint_key,
    endpoint_limiter,
    forget_limiter,
)
from fusion_graph.integrations.openai_fanout import ChatOpenAIFanOut, forget_ignores_n

__all__ = [
    "ChatOpenAICompatible",
    "EndpointLimiter",
    "endpoint_limiter",
    "forget_endpoint",
    "openai_compatible",
]

_OPENAI_HOST = "api.openai.com"


# ---------------------------------------------------------------------------------------------
# What this process keeps per endpoint and per event loop
# ---------------------------------------------------------------------------------------------

# _REGISTRY_LOCK guards _LOOP_TWINS (each event loop's copies of the models, see _for_this_loop).
_REGISTRY_LOCK = threading.Lock()
_LOOP_TWINS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[int, tuple[ChatOpenAICompatible, ChatOpenAICompatible]]
] = weakref.WeakKeyDictionary()


def forget_endpoint(base_url: str | None) -> None:
    """Drop what this process learned about an endpoint: its limiter (once idle) and whether it
    ignores ``n``. Useful when a server is restarted with other settings, and in tests."""
    forget_limiter(base_url)
    forget_ignores_n(endpoint_key(base_url))


# ---------------------------------------------------------------------------------------------
# The chat model
# ---------------------------------------------------------------------------------------------


class ChatOpenAICompatible(ChatOpenAIFanOut):
    """``ChatOpenAI`` for any OpenAI-compatible server, with one-request fan-out (``n=k``), a
    fallback for servers that ignore ``n``, per-candidate seeds and a per-endpoint bound on
    requests in flight. Build it with :func:`openai_compatible`, or like ``ChatOpenAI``.

    Example:
        >>> llm = ChatOpenAICompatible(
        ...     base_url="http://127.0.0.1:8080/v1", model="local", api_key="none",
        ...     supports_n=False, max_concurrency=2,
        ... )
        >>> replies = llm.sample_n("Name a colour.", seeds=[1, 2, 3])  # doctest: +SKIP
    """

    max_concurrency: int = Field(default=DEFAULT_MAX_CONCURRENCY, ge=1)
    """Requests in flight to this endpoint, from the whole process (the smallest limit any
    model names for one base URL wins)."""
    max_tokens_key: Literal["max_tokens", "max_completion_tokens"] | None = None
    """The request field carrying ``max_tokens``. None: ``max_completion_tokens`` for
    api.openai.com, ``max_tokens`` elsewhere (what vLLM, llama.cpp and most servers read)."""

    @property
    def _llm_type(self) -> str:
        return "fusion-graph-openai-compatible"

    # -- where and how ------------------------------------------------------------------------

    @property
    def limiter(self) -> EndpointLimiter:
        """This endpoint's :class:`EndpointLimiter`."""
        return endpoint_limiter(self.openai_api_base, self.max_concurrency)

    def _get_request_payload(
        self, input_: LanguageModelInput, *, stop: list[str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        payload: dict[str, Any] = super()._get_request_payload(input_, stop=stop, **kwargs)
        key = self.max_tokens_key
        if key is None:
            host = urlsplit(self.endpoint).hostname or ""
            key = "max_completion_tokens" if host == _OPENAI_HOST else "max_tokens"
        if key == "max_tokens" and "max_completion_tokens" in payload:
            payload["max_tokens"] = payload.pop("max_completion_tokens")
        if not self.supports_seed:
            payload.pop("seed", None)
        return payload

    # -- every request holds a slot of the endpoint -------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        with self.limiter.slot():
            return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        twin = self._for_this_loop()
        async with self.limiter.aslot():
            return await super(ChatOpenAICompatible, twin)._agenerate(
                messages, stop=stop, run_manager=run_manager, **kwargs
            )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        with self.limiter.slot():
            yield from super()._stream(messages, stop=stop, run_manager=run_manager, **kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        twin = self._for_this_loop()
        async with self.limiter.aslot():
            async for chunk in super(ChatOpenAICompatible, twin)._astream(
                messages, stop=stop, run_manager=run_manager, **kwargs
            ):
                yield chunk

    def _for_this_loop(self) -> ChatOpenAICompatible:
        """This model with an async HTTP client of the running event loop's own.

        langchain-openai shares one async HTTP connection pool per base URL across event
        loops, so the second ``asyncio.run`` that reuses a pooled connection fails with "Event
        loop is closed". Each event loop gets its own client here (unless you passed
        ``http_async_client``, which is then yours to manage).
        """
        if self.http_async_client is not None or self.root_async_client is None:
            return self
        import openai  # installed: openai_fanout, imported above, checks for it

        loop = asyncio.get_running_loop()
        with _REGISTRY_LOCK:
            twins = _LOOP_TWINS.setdefault(loop, {})
            found = twins.get(id(self))
            if found is not None and found[0] is self:
                return found[1]
            root = self.root_async_client.copy(http_client=openai.DefaultAsyncHttpxClient())
            twin = self.model_copy(
                update={"root_async_client": root, "async_client": root.chat.completions}
            )
            twins[id(self)] = (self, twin)  # holding self keeps its id unique
            return twin


def _is_loopback(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost
        return False


def openai_compatible(
    base_url: str,
    model: str,
    *,
    api_key_env: str = "OPENAI_API_KEY",
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    supports_n: bool | None = None,
    supports_seed: bool = True,
    **kwargs: Any,
) -> ChatOpenAICompatible:
    """A chat model for the OpenAI-compatible server at ``base_url`` serving ``model``.

    The API key is read from the environment variable ``api_key_env``. A server on loopback
    needs none (a placeholder is sent); any other server without the variable set is an error.
    ``kwargs`` go to :class:`ChatOpenAICompatible` / ``ChatOpenAI`` (``temperature``,
    ``max_tokens``, ``timeout``, ``max_retries``, ...).

    Example:
        >>> llm = openai_compatible("http://127.0.0.1:8000/v1", "SmolLM2", max_tokens=64)
        >>> llm.endpoint
        'http://127.0.0.1:8000/v1'

    Raises:
        ValueError: the URL is not http(s), or no API key is set for a remote server.
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = (
            f"The base URL {base_url!r} is not an http(s) URL; pass the server's API root, "
            "e.g. http://127.0.0.1:8000/v1."
        )
        raise ValueError(msg)
    api_key = os.environ.get(api_key_env)
    if not api_key:
        if not _is_loopback(base_url):
            msg = (
                f"No API key for {base_url}: set the environment variable {api_key_env} (or "
                "pass api_key_env= naming the one that holds it; for a server that needs no "
                "key, set it to any value, e.g. EMPTY)."
            )
            raise ValueError(msg)
        api_key = "not-needed"
    return ChatOpenAICompatible(
        base_url=base_url,
        model=model,
        api_key=api_key,
        max_concurrency=max_concurrency,
        supports_n=supports_n,
        supports_seed=supports_seed,
        **kwargs,
    )
