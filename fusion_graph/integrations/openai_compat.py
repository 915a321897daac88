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
    :class:`~fusion_graph.integrations.endpoint_limits.EndpointLimiter` while it runs (not
    while it waits for one), so a fan-out of 64 candidates keeps at most the endpoint's limit
    of requests in flight. The default limit is 64 for a server on loopback (``localhost``,
    ``127.0.0.0/8``, ``::1``: vLLM, llama.cpp's server, Ollama batch or queue what they
    receive, and a lower cap only slows a fan-out against a server that ignores ``n``: at 8,
    N=64 took 4.4x as long as uncapped) and 16 for any other host (hosted APIs are shared
    and rate-limited). Tune it per endpoint with ``max_concurrency=`` (of
    :func:`openai_compatible` or the model) or the ``concurrency=`` option of a model spec
    (``openai:URL:MODEL:concurrency=32``; the batch jobs' ``--endpoint-concurrency``): a
    named limit replaces the default, up or down, and when several models name different
    limits for one endpoint the smallest wins. A model that names none leaves the endpoint's
    limit as it is. ``EndpointLimiter`` and ``endpoint_limiter`` are re-exported here.

Requests
    A request that is not streamed goes out on a lean path
    (:mod:`~fusion_graph.integrations.openai_requests`): the payload langchain-openai builds,
    as JSON, on an ``aiohttp`` session of the event loop's own, and the answer read back
    with langchain-openai's own parsing; the same messages, metadata, exception classes and
    retries (``max_retries``) as through the SDK, for about a tenth of the client CPU. A
    blocking call (``invoke``) sends it from fusion-graph's background event loop, so sync
    and async callers share one connection pool. When
    no callback handler is attached (no LangSmith tracing, no handler in the call's config,
    none from a configure hook), ``invoke``, ``ainvoke`` and ``sample_n`` call
    ``_generate`` directly, without langchain-core's run bookkeeping
    (:mod:`~fusion_graph.integrations.untraced`); with a handler they take the ordinary
    path, so runs nest as before. Streams, the Responses API, a ``response_format`` class,
    ``http_client`` / ``http_async_client``, ``openai_proxy`` (or proxy variables for a
    remote host), ``include_response_headers`` and a callable API key use the SDK.

Timing
    Each reply of a request that is not streamed holds in its ``response_metadata``
    ``queue_s`` (the time the request waited for a slot of the endpoint) and ``latency_s``
    (the request's own time, slot held). fusion-graph takes a multi-sample call's candidate
    latencies from ``latency_s``, so they leave out the time queued behind the others.

Event loops
    A connection belongs to the event loop that opened it, so each event loop has its own:
    the lean path's HTTP session, and for what still goes through the SDK a copy of the model
    with its own HTTP client (unless you pass ``http_async_client``, which is then yours to
    manage). They are closed when the loop shuts down (``asyncio.run`` and
    ``asyncio.Runner`` do that before closing the loop), so repeated ``asyncio.run`` calls
    keep no loops, clients or connections alive (:mod:`~fusion_graph.integrations.loop_clients`).

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
import contextlib
import functools
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig, ensure_config
from pydantic import Field, SecretStr

from fusion_graph.integrations.endpoint_limits import (
    DEFAULT_MAX_CONCURRENCY as DEFAULT_MAX_CONCURRENCY,  # re-exported: it used to live here
)
from fusion_graph.integrations.endpoint_limits import (
    EndpointLimiter,
    endpoint_key,
    endpoint_limiter,
    forget_limiter,
    is_loopback,
)
from fusion_graph.integrations.loop_clients import copy_for, http_session, keep_copy
from fusion_graph.integrations.openai_fanout import ChatOpenAIFanOut, forget_ignores_n
from fusion_graph.integrations.openai_requests import ChatRequest, apost, build_request
from fusion_graph.integrations.untraced import STRUCTURED_OUTPUT_KEYS, finish, unobserved
from fusion_graph.runtime import run_sync

__all__ = [
    "ChatOpenAICompatible",
    "EndpointLimiter",
    "endpoint_limiter",
    "forget_endpoint",
    "openai_compatible",
]

_OPENAI_HOST = "api.openai.com"
_is_loopback = is_loopback  # the name it had when it lived here
_PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)


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

    max_concurrency: int | None = Field(default=None, ge=1)
    """Requests in flight to this endpoint, from the whole process. None leaves the
    endpoint's limit as it is (64 on loopback, 16 elsewhere, unless someone named one); a
    number replaces that default, and the smallest limit any model names for one base URL
    wins."""
    io_on_event_loop: ClassVar[bool] = True
    """Its async calls do their I/O on the event loop, so fusion-graph's sync API calls it
    with ``ainvoke`` on its background loop rather than with ``invoke`` on a thread per
    request (:func:`fusion_graph.runtime.does_io_on_event_loop`)."""
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
            key = "max_completion_tokens" if _is_openai(self.endpoint) else "max_tokens"
        if key == "max_tokens" and "max_completion_tokens" in payload:
            payload["max_tokens"] = payload.pop("max_completion_tokens")
        if not self.supports_seed:
            payload.pop("seed", None)
        if "messages" in payload:  # chat completions (not the Responses API)
            # A field the SDK does not know (a server's own option, e.g. llama.cpp's
            # repeat_penalty) goes in extra_body: the SDK sends it instead of raising
            # TypeError, as the lean path, which sends the body as it is, always did.
            fields = _sdk_fields()
            own = {key: payload.pop(key) for key in list(payload) if key not in fields}
            if own:
                payload["extra_body"] = {**own, **(payload.get("extra_body") or {})}
        return payload

    # -- the lean path: no SDK, no callback bookkeeping nobody listens to ----------------------

    def _lean_request(self, payload: dict[str, Any]) -> ChatRequest | None:
        """``payload`` as a request of the lean path, or None when the SDK must send it: a
        stream, the Responses API, a ``response_format`` class (the SDK parses into it),
        clients or a proxy of the user's, response headers asked for, no base URL."""
        if payload.get("stream") or "messages" not in payload:
            return None
        if not isinstance(payload.get("response_format", {}), dict):
            return None
        if self.http_client is not None or self.http_async_client is not None:
            return None
        if self.openai_proxy or self.include_response_headers:
            return None
        if self.openai_api_base is None:
            return None  # the SDK's default, which OPENAI_BASE_URL may change
        key = self.openai_api_key
        if key is not None and not isinstance(key, SecretStr):
            return None  # a callable key: the SDK knows when to call it
        base_url = self.endpoint
        if not _is_loopback(base_url) and any(os.environ.get(v) for v in _PROXY_VARIABLES):
            return None  # the session of the lean path reads no proxy settings
        return build_request(
            payload,
            base_url=base_url,
            api_key=key.get_secret_value() if key is not None else None,
            organization=self.openai_organization,
            default_headers=self.default_headers,
            default_query=self.default_query,
            timeout=self.request_timeout,
            max_retries=self.max_retries,
        )

    def _lean_result(self, data: dict[str, Any], payload: dict[str, Any]) -> ChatResult:
        """The answer of a lean request as langchain-openai makes it from the SDK's, with each
        choice's own ``finish_reason`` and ``logprobs`` (langchain-openai gives every choice the
        last one's) and, for a ``response_format`` request, ``parsed`` and ``refusal`` in
        ``additional_kwargs`` as the SDK's ``parse`` gives them (``parsed``: the JSON object of
        the content, or None)."""
        result = self._create_chat_result(data, {})
        structured = "response_format" in payload
        choices = data.get("choices") or []
        for generation, choice in zip(result.generations, choices, strict=False):
            info: dict[str, Any] = {"finish_reason": choice.get("finish_reason")}
            if "logprobs" in choice:
                info["logprobs"] = choice["logprobs"]
            generation.generation_info = info
            if structured and isinstance(generation.message, AIMessage):
                extra = generation.message.additional_kwargs
                extra["parsed"] = _parsed(generation.message.content)
                extra["refusal"] = (choice.get("message") or {}).get("refusal")
        return result

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        config = ensure_config(config)
        if not unobserved(self, config):
            return super().invoke(input, config, stop=stop, **kwargs)
        for key in STRUCTURED_OUTPUT_KEYS:
            kwargs.pop(key, None)
        messages = self._convert_input(input).to_messages()
        return _reply(finish(self._generate(messages, stop=stop, **kwargs)))

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        config = ensure_config(config)
        if not unobserved(self, config):
            return await super().ainvoke(input, config, stop=stop, **kwargs)
        for key in STRUCTURED_OUTPUT_KEYS:
            kwargs.pop(key, None)
        messages = self._convert_input(input).to_messages()
        return _reply(finish(await self._agenerate(messages, stop=stop, **kwargs)))

    # -- every request holds a slot of the endpoint -------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        payload = self._get_request_payload(messages, stop=stop, **kwargs)
        request = self._lean_request(payload)
        if request is not None:
            return run_sync(lambda: self._lean_call(request, payload))
        queued = time.perf_counter()
        with self.limiter.slot():
            start = time.perf_counter()
            result = super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)
            return _timed(result, start - queued, time.perf_counter() - start)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        payload = self._get_request_payload(messages, stop=stop, **kwargs)
        request = self._lean_request(payload)
        if request is not None:
            return await self._lean_call(request, payload)
        twin = await self._for_this_loop()
        queued = time.perf_counter()
        async with self.limiter.aslot():
            start = time.perf_counter()
            result = await super(ChatOpenAICompatible, twin)._agenerate(
                messages, stop=stop, run_manager=run_manager, **kwargs
            )
            return _timed(result, start - queued, time.perf_counter() - start)

    async def _aseparate(
        self,
        messages: list[BaseMessage],
        seeds: Sequence[int | None],
        kwargs: dict[str, Any],
        quiet: bool,
    ) -> list[AIMessage | Exception]:
        """The requests of a server that ignores ``n``, which differ only in their seed: on the
        lean path their payload is built once (langchain-openai's conversion of the messages
        is most of a request's CPU before it is sent, and request i leaves after the i
        before it are built)."""
        if not quiet:  # each request is a run of its own
            return await super()._aseparate(messages, seeds, kwargs, quiet)
        payload = self._get_request_payload(messages, **self._call_kwargs(None, kwargs, 1))
        if self._lean_request(payload) is None:
            return await super()._aseparate(messages, seeds, kwargs, quiet)

        async def send(seed: int | None) -> list[ChatGeneration]:
            seeded = payload
            if seed is not None and self.supports_seed:
                seeded = {**payload, "seed": seed}
            request = self._lean_request(seeded)
            assert request is not None  # a seed does not change the path a payload takes
            return list(finish(await self._lean_call(request, seeded)).generations)

        replies = (self._aone(seed, functools.partial(send, seed)) for seed in seeds)
        return list(await asyncio.gather(*replies))

    async def _lean_call(self, request: ChatRequest, payload: dict[str, Any]) -> ChatResult:
        """Send a request of the lean path on the running loop's session, holding a slot."""
        session = await http_session()
        queued = time.perf_counter()
        async with self.limiter.aslot():
            start = time.perf_counter()
            data = await apost(session, request)
            latency = time.perf_counter() - start
        return _timed(self._lean_result(data, payload), start - queued, latency)

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
        twin = await self._for_this_loop()
        async with self.limiter.aslot():
            async for chunk in super(ChatOpenAICompatible, twin)._astream(
                messages, stop=stop, run_manager=run_manager, **kwargs
            ):
                yield chunk

    async def _for_this_loop(self) -> ChatOpenAICompatible:
        """This model with an async HTTP client of the running event loop's own.

        langchain-openai shares one async HTTP connection pool per base URL across event
        loops, so the second ``asyncio.run`` that reuses a pooled connection fails with "Event
        loop is closed". Each event loop gets its own copy of the model here, with its own
        client (unless you passed ``http_async_client``, which is then yours to manage). The
        copy is made once per loop and model, and its client is closed when the loop shuts
        down (see the module docs).
        """
        if self.http_async_client is not None or self.root_async_client is None:
            return self
        import openai  # installed: openai_fanout, imported above, checks for it

        found = copy_for(self)
        if isinstance(found, ChatOpenAICompatible):
            return found
        root = self.root_async_client.copy(http_client=openai.DefaultAsyncHttpxClient())
        twin = self.model_copy(
            update={"root_async_client": root, "async_client": root.chat.completions}
        )
        await keep_copy(self, twin, _close_twin)
        return twin


@functools.cache
def _sdk_fields() -> frozenset[str]:
    """What the SDK's ``chat.completions.create`` takes (body fields and request options)."""
    from openai.resources.chat import Completions  # installed: openai_fanout checks for it

    return frozenset(inspect.signature(Completions.create).parameters)


@functools.lru_cache(maxsize=256)
def _is_openai(endpoint: str) -> bool:
    """Whether ``endpoint`` is OpenAI's own API (which reads ``max_completion_tokens``)."""
    return (urlsplit(endpoint).hostname or "") == _OPENAI_HOST


async def _close_twin(twin: ChatOpenAICompatible) -> None:
    if twin.root_async_client is not None:
        with contextlib.suppress(Exception):  # closing is best effort
            await twin.root_async_client.close()


def _parsed(content: object) -> object:
    """The JSON object a structured reply holds, or None."""
    if not isinstance(content, str):
        return None
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _reply(result: ChatResult) -> AIMessage:
    message = result.generations[0].message
    if not isinstance(message, AIMessage):
        msg = "The server answered with a choice that is not a chat message."
        raise TypeError(msg)
    return message


def _timed(result: ChatResult, queue_s: float, latency_s: float) -> ChatResult:
    """Record in each reply's metadata how long its request queued for a slot and ran."""
    for generation in result.generations:
        message = generation.message
        message.response_metadata = {
            **message.response_metadata,
            "queue_s": queue_s,
            "latency_s": latency_s,
        }
    return result


def openai_compatible(
    base_url: str,
    model: str,
    *,
    api_key_env: str = "OPENAI_API_KEY",
    max_concurrency: int | None = None,
    supports_n: bool | None = None,
    supports_seed: bool = True,
    **kwargs: Any,
) -> ChatOpenAICompatible:
    """A chat model for the OpenAI-compatible server at ``base_url`` serving ``model``.

    The API key is read from the environment variable ``api_key_env``. A server on loopback
    needs none (a placeholder is sent); any other server without the variable set is an error.
    ``max_concurrency`` bounds the requests in flight to ``base_url`` from the whole process;
    None keeps the endpoint's limit (by default 64 on loopback, 16 elsewhere: see the module
    docs). ``kwargs`` go to :class:`ChatOpenAICompatible` / ``ChatOpenAI`` (``temperature``,
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
