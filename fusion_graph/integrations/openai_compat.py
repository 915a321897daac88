"""Any OpenAI-compatible server (vLLM, llama.cpp's server, hosted APIs) as a generator, critic,
fusor or judge, with backend-aware fan-out.

Install with ``pip install 'fusion-graph[openai]'``.

Fan-out
    :class:`ChatOpenAICompatible` is a ``langchain_openai.ChatOpenAI`` that also implements
    :class:`~fusion_graph.nodes.generate.SupportsSampleN`, so fusion-graph hands it all the
    candidates it makes in ONE call, ``sample_n(messages, seeds=[...])``. It then asks the
    server for them in one request with ``n=k`` (the prompt is processed once, and vLLM
    decodes the k samples as one batch) and splits the choices into k replies, each with its
    own share of the usage. A backend that ignores ``n`` answers with fewer choices (llama.cpp's
    server returns one); the missing ones are then made by extra concurrent requests, and the
    endpoint is remembered as one that ignores ``n``, so later fan-outs go straight to k
    parallel requests. ``supports_n=False`` skips the ``n`` request altogether; ``True`` trusts
    the server (no extra requests are made even if it returns fewer choices: those candidates
    fail).

Seeds
    A request carries one seed. The ``n=k`` request uses the first candidate's seed (vLLM still
    gives k distinct samples); every separate request uses its own candidate's seed. Servers
    that reject ``seed`` can be used with ``supports_seed=False``.

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
import contextvars
import ipaddress
import os
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import ensure_config
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
from fusion_graph.integrations.usage import shares
from fusion_graph.runtime import THREAD_POOL

try:
    import openai
    from langchain_openai import ChatOpenAI
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    msg = (
        "OpenAI-compatible endpoints need langchain-openai; install it with "
        "`pip install 'fusion-graph[openai]'`."
    )
    raise ImportError(msg) from exc

__all__ = [
    "ChatOpenAICompatible",
    "EndpointLimiter",
    "endpoint_limiter",
    "forget_endpoint",
    "openai_compatible",
]

T = TypeVar("T")

_OPENAI_HOST = "api.openai.com"


# ---------------------------------------------------------------------------------------------
# What this process learned about endpoints
# ---------------------------------------------------------------------------------------------

_REGISTRY_LOCK = threading.Lock()
_IGNORES_N: dict[tuple[str, str], bool] = {}
_LOOP_TWINS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[int, tuple[ChatOpenAICompatible, ChatOpenAICompatible]]
] = weakref.WeakKeyDictionary()


def forget_endpoint(base_url: str | None) -> None:
    """Drop what this process learned about an endpoint: its limiter (once idle) and whether it
    ignores ``n``. Useful when a server is restarted with other settings, and in tests."""
    forget_limiter(base_url)
    key = endpoint_key(base_url)
    with _REGISTRY_LOCK:
        for known in [k for k in _IGNORES_N if k[0] == key]:
            del _IGNORES_N[known]


# ---------------------------------------------------------------------------------------------
# Usage shares
# ---------------------------------------------------------------------------------------------


def _choice_tokens(
    total: int, texts: Sequence[str], finish: Sequence[str | None], max_tokens: int | None
) -> list[int]:
    """Completion tokens per choice when the server reports only their sum: a choice cut at
    ``max_tokens`` produced exactly that many; the rest is split by text length."""
    counts = [0] * len(texts)
    rest = total
    open_ = []
    for i, reason in enumerate(finish):
        if reason == "length" and max_tokens is not None and rest >= max_tokens:
            counts[i] = max_tokens
            rest -= max_tokens
        else:
            open_.append(i)
    for i, part in zip(open_, shares(rest, [len(texts[i]) + 1 for i in open_]), strict=True):
        counts[i] = part
    return counts


def _split_usage(
    usage: UsageMetadata | None,
    messages: Sequence[AIMessage],
    finish: Sequence[str | None],
    max_tokens: int | None,
    exact_output: Sequence[int | None],
) -> list[UsageMetadata | None]:
    """One usage per choice of a single ``n=k`` response; the shares add up to the response's
    usage (prompt tokens split evenly, completion tokens as in :func:`_choice_tokens`)."""
    if usage is None:
        return [None] * len(messages)
    k = len(messages)
    inputs = shares(usage["input_tokens"], [1] * k)
    if all(x is not None for x in exact_output):
        outputs = [int(x or 0) for x in exact_output]
    else:
        texts = [m.text for m in messages]
        outputs = _choice_tokens(usage["output_tokens"], texts, finish, max_tokens)
    cached = (usage.get("input_token_details") or {}).get("cache_read")
    cached_shares = shares(cached, [1] * k) if cached is not None else None
    result: list[UsageMetadata | None] = []
    for i in range(k):
        one = UsageMetadata(
            input_tokens=inputs[i],
            output_tokens=outputs[i],
            total_tokens=inputs[i] + outputs[i],
        )
        if cached_shares is not None:
            one["input_token_details"] = InputTokenDetails(cache_read=cached_shares[i])
        result.append(one)
    return result


# ---------------------------------------------------------------------------------------------
# The chat model
# ---------------------------------------------------------------------------------------------


class ChatOpenAICompatible(ChatOpenAI):
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
    supports_n: bool | None = None
    """Whether the server honours ``n``: None tries and detects (fewer choices than asked
    means no, and the rest is filled with extra requests); False always sends separate
    requests; True always trusts one request."""
    supports_seed: bool = True
    """Send each request's ``seed``; turn off for servers that reject the field."""
    max_tokens_key: Literal["max_tokens", "max_completion_tokens"] | None = None
    """The request field carrying ``max_tokens``. None: ``max_completion_tokens`` for
    api.openai.com, ``max_tokens`` elsewhere (what vLLM, llama.cpp and most servers read)."""

    @property
    def _llm_type(self) -> str:
        return "fusion-graph-openai-compatible"

    # -- where and how ------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The base URL requests go to (the key of the concurrency bound)."""
        return endpoint_key(self.openai_api_base)

    @property
    def limiter(self) -> EndpointLimiter:
        """This endpoint's :class:`EndpointLimiter`."""
        return endpoint_limiter(self.openai_api_base, self.max_concurrency)

    def _ignores_n(self) -> bool:
        if self.supports_n is not None:
            return not self.supports_n
        return _IGNORES_N.get((self.endpoint, self.model_name), False)

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

    # -- fan-out --------------------------------------------------------------------------------

    def sample_n(
        self, messages: LanguageModelInput, *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]:
        """Make ``len(seeds)`` replies to ``messages``: one request with ``n=k`` when the server
        honours ``n``, else (or for what it left out) separate concurrent requests.

        ``kwargs`` are call options (``temperature``, ``max_tokens``, ``stop``, ...). A reply
        that could not be made is that element's exception; when the ``n=k`` request itself
        fails, this raises (so the caller's retry policy applies to the whole group).

        Each reply's ``response_metadata`` holds ``seed`` (the seed of the request that made
        it), ``request_n`` (the ``n`` of that request), ``choice_index``, ``latency_s`` (that
        request's) and ``usage_split`` (True when its usage is a share of the request's).
        """
        messages_ = self._convert_input(messages).to_messages()
        k = len(seeds)
        if k == 0:
            return []
        replies: list[AIMessage | Exception] = []
        if k > 1 and not self._ignores_n():
            try:
                replies = self._n_request(messages_, seeds, kwargs)
            except openai.BadRequestError as exc:
                if self.supports_n is not None or not _rejects_n(exc):
                    raise
                self._remember_ignores_n()  # the server rejects n > 1: never ask again
        missing = list(range(len(replies), k))
        futures = [
            THREAD_POOL.submit(_in_context(self._single), messages_, seeds[i], kwargs)
            for i in missing
        ]
        for future in futures:
            replies.append(future.result())
        return replies

    async def asample_n(
        self, messages: LanguageModelInput, *, seeds: Sequence[int | None], **kwargs: Any
    ) -> list[AIMessage | Exception]:
        """Async :meth:`sample_n`."""
        messages_ = self._convert_input(messages).to_messages()
        k = len(seeds)
        if k == 0:
            return []
        replies: list[AIMessage | Exception] = []
        if k > 1 and not self._ignores_n():
            try:
                replies = await self._an_request(messages_, seeds, kwargs)
            except openai.BadRequestError as exc:
                if self.supports_n is not None or not _rejects_n(exc):
                    raise
                self._remember_ignores_n()
        missing = range(len(replies), k)
        replies += await asyncio.gather(
            *(self._asingle(messages_, seeds[i], kwargs) for i in missing)
        )
        return replies

    def _remember_ignores_n(self) -> None:
        with _REGISTRY_LOCK:
            _IGNORES_N[(self.endpoint, self.model_name)] = True

    def _call_kwargs(self, seed: int | None, kwargs: dict[str, Any], n: int) -> dict[str, Any]:
        if "seed" in kwargs or "n" in kwargs:
            msg = "sample_n takes one seed per candidate; pass seeds=[...], not seed= or n=."
            raise TypeError(msg)
        call: dict[str, Any] = {**kwargs, "stream": False}
        if seed is not None and self.supports_seed:
            call["seed"] = seed
        if n > 1:
            call["n"] = n
        return call

    def _n_request(
        self, messages: list[BaseMessage], seeds: Sequence[int | None], kwargs: dict[str, Any]
    ) -> list[AIMessage | Exception]:
        call = self._call_kwargs(seeds[0], kwargs, len(seeds))
        config = ensure_config()
        start = time.perf_counter()
        result = self.generate(
            [messages],
            callbacks=config.get("callbacks"),
            tags=config.get("tags"),
            metadata=config.get("metadata"),
            **call,
        )
        return self._split(result, seeds, kwargs, time.perf_counter() - start)

    async def _an_request(
        self, messages: list[BaseMessage], seeds: Sequence[int | None], kwargs: dict[str, Any]
    ) -> list[AIMessage | Exception]:
        call = self._call_kwargs(seeds[0], kwargs, len(seeds))
        config = ensure_config()
        start = time.perf_counter()
        result = await self.agenerate(
            [messages],
            callbacks=config.get("callbacks"),
            tags=config.get("tags"),
            metadata=config.get("metadata"),
            **call,
        )
        return self._split(result, seeds, kwargs, time.perf_counter() - start)

    def _split(
        self,
        result: LLMResult,
        seeds: Sequence[int | None],
        kwargs: dict[str, Any],
        latency_s: float,
    ) -> list[AIMessage | Exception]:
        """The choices of one ``n=k`` response as separate replies (at most k)."""
        k = len(seeds)
        generations = result.generations[0][:k]
        if len(generations) < k and self.supports_n is None:
            self._remember_ignores_n()  # fewer choices than asked: the server ignores n
        messages: list[AIMessage] = []
        finish: list[str | None] = []
        exact: list[int | None] = []
        for generation in generations:
            message = getattr(generation, "message", None)
            if not isinstance(message, AIMessage):
                msg = "The server answered with a choice that is not a chat message."
                raise TypeError(msg)
            info = generation.generation_info or {}
            messages.append(message)
            finish.append(info.get("finish_reason"))
            logprobs = info.get("logprobs")
            content = logprobs.get("content") if isinstance(logprobs, dict) else None
            exact.append(len(content) if isinstance(content, list) else None)
        usage = messages[0].usage_metadata if messages else None
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        shares = _split_usage(usage, messages, finish, max_tokens, exact)
        replies: list[AIMessage | Exception] = []
        for index, (message, share) in enumerate(zip(messages, shares, strict=True)):
            metadata = {
                **message.response_metadata,
                "model_name": self.model_name,
                "finish_reason": finish[index],
                "seed": seeds[0],
                "request_n": k,
                "choice_index": index,
                "latency_s": latency_s,
                "usage_split": share is not None,
            }
            replies.append(
                message.model_copy(update={"usage_metadata": share, "response_metadata": metadata})
            )
        if self.supports_n:
            replies += [
                RuntimeError(
                    f"The server returned {len(messages)} choices for n={k}; create the model "
                    "with supports_n=None (detect) or False so the rest are requested "
                    "separately."
                )
                for _ in range(k - len(messages))
            ]
        return replies

    def _single(
        self, messages: list[BaseMessage], seed: int | None, kwargs: dict[str, Any]
    ) -> AIMessage | Exception:
        call = self._call_kwargs(seed, kwargs, 1)
        config = ensure_config()
        start = time.perf_counter()
        try:
            result = self.generate(
                [messages],
                callbacks=config.get("callbacks"),
                tags=config.get("tags"),
                metadata=config.get("metadata"),
                **call,
            )
            return self._one(result, seed, time.perf_counter() - start)
        except Exception as exc:  # one candidate's failure is that candidate's
            return exc

    async def _asingle(
        self, messages: list[BaseMessage], seed: int | None, kwargs: dict[str, Any]
    ) -> AIMessage | Exception:
        call = self._call_kwargs(seed, kwargs, 1)
        config = ensure_config()
        start = time.perf_counter()
        try:
            result = await self.agenerate(
                [messages],
                callbacks=config.get("callbacks"),
                tags=config.get("tags"),
                metadata=config.get("metadata"),
                **call,
            )
            return self._one(result, seed, time.perf_counter() - start)
        except Exception as exc:
            return exc

    def _one(self, result: LLMResult, seed: int | None, latency_s: float) -> AIMessage:
        generation = result.generations[0][0]
        message = getattr(generation, "message", None)
        if not isinstance(message, AIMessage):
            msg = "The server answered with a choice that is not a chat message."
            raise TypeError(msg)
        metadata = {
            **message.response_metadata,
            "seed": seed,
            "request_n": 1,
            "choice_index": 0,
            "latency_s": latency_s,
            "usage_split": False,
        }
        return message.model_copy(update={"response_metadata": metadata})


def _in_context(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run in a copy of the caller's context (so the run's config follows it)."""
    ctx = contextvars.copy_context()

    def run(*args: Any) -> T:
        return ctx.run(fn, *args)

    return run


_N_WORD = re.compile(r"(?<![\w-])['\"`]?n['\"`]?(?![\w-])")


def _rejects_n(exc: openai.BadRequestError) -> bool:
    """Whether a 400 answer is about the ``n`` field (a server that only allows n=1)."""
    return getattr(exc, "param", None) == "n" or bool(_N_WORD.search(exc.message))


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
