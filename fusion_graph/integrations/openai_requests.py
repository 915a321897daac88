"""Chat-completions requests without the OpenAI SDK: the lean path of
:class:`~fusion_graph.integrations.openai_compat.ChatOpenAICompatible` for the calls
fusion-graph makes in bulk (candidates, judges, critics).

The SDK spends about 2 ms of CPU on a request with a JSON-schema ``response_format`` (it
walks the schema against its typed parameters, then builds typed response objects that
langchain-openai dumps back to dicts), and its HTTP library another 0.6-4 ms (httpx's pool
gets slower the more connections it holds). Here a request is the payload langchain-openai
builds, as JSON, sent with an ``aiohttp`` session (about 0.15 ms of CPU a request); the
answer is parsed with ``json`` and handed to langchain-openai's own ``_create_chat_result``.
What the caller sees is the same: the same messages and metadata, and on failure the same
exception classes (``langchain_openai``'s ``OpenAIRateLimitError``, ``OpenAIAPIError``,
``OpenAIConnectionError``, ``OpenAITimeoutError``, ...: subclasses of the ``openai`` ones),
retried like the SDK retries them (``max_retries``, default 2: connection errors, 408, 409,
429 and 5xx, waiting what ``Retry-After`` says or an exponential backoff).
"""

from __future__ import annotations

import functools
import importlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import openai
from langchain_openai.chat_models.base import (
    OpenAIAPIError,
    OpenAIAuthenticationError,
    OpenAIConnectionError,
    OpenAIContextOverflowError,
    OpenAIInvalidRequestError,
    OpenAIModelNotFoundError,
    OpenAIPermissionDeniedError,
    OpenAIRateLimitError,
    OpenAITimeoutError,
)
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from fusion_graph.runtime import retry_after_s

# The HTTP library the installed SDK builds its errors' requests and responses from (httpx2
# for openai 3, httpx before): the module of the class its default client derives from.
_sdk_http: Any = importlib.import_module(
    openai.DefaultHttpxClient.__mro__[1].__module__.partition(".")[0]
)

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "ChatRequest",
    "apost",
    "build_request",
]

DEFAULT_TIMEOUT_S = 600.0
"""The SDK's default timeout for a request."""
DEFAULT_MAX_RETRIES = 2
"""The SDK's default retries."""
_REQUEST_OPTIONS = ("timeout", "extra_headers", "extra_query", "extra_body")
"""Payload keys that are options of the SDK's request, not fields of the JSON body."""
_CONTEXT_OVERFLOW = (
    "context_length_exceeded",
    "Input tokens exceed the configured limit",
    "prompt is too long",
    "ContextWindowExceededError",
)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat-completions request, ready to send."""

    url: str
    """The full URL, query included."""
    headers: dict[str, str]
    body: bytes
    timeout: float | None
    max_retries: int


def _seconds(timeout: Any) -> float | None:
    """One overall timeout from what langchain-openai and the SDK accept (seconds, a
    ``(connect, read)`` tuple, an ``httpx.Timeout``)."""
    if timeout is None or isinstance(timeout, int | float):
        return None if timeout is None else float(timeout)
    if isinstance(timeout, tuple):
        values = [float(v) for v in timeout if v is not None]
        return max(values) if values else None
    parts = [getattr(timeout, name, None) for name in ("connect", "read", "write", "pool")]
    values = [float(v) for v in parts if v is not None]
    return max(values) if values else None


def build_request(
    payload: dict[str, Any],
    *,
    base_url: str,
    api_key: str | None,
    organization: str | None = None,
    default_headers: Mapping[str, str] | None = None,
    default_query: Mapping[str, object] | None = None,
    timeout: Any = DEFAULT_TIMEOUT_S,
    max_retries: int | None = None,
) -> ChatRequest:
    """The request for ``payload`` (as langchain-openai builds it for the SDK: the SDK's
    request options ``timeout``, ``extra_headers``, ``extra_query`` and ``extra_body`` are
    taken out of it and applied)."""
    body = dict(payload)
    request_timeout = body.pop("timeout", timeout)
    extra_headers = body.pop("extra_headers", None) or {}
    extra_query = body.pop("extra_query", None) or {}
    extra_body = body.pop("extra_body", None) or {}
    body.update(extra_body)
    url = base_url.rstrip("/") + "/chat/completions"
    if default_query or extra_query:
        query = urlencode({**(default_query or {}), **extra_query})
        url += ("&" if "?" in url else "?") + query
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Accept-Encoding": "identity",  # small JSON on a fast link: compression costs more
    }
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if organization:
        headers["OpenAI-Organization"] = organization
    headers.update(default_headers or {})
    headers.update(extra_headers)
    return ChatRequest(
        url=url,
        headers=headers,
        body=json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
        timeout=_seconds(DEFAULT_TIMEOUT_S if request_timeout is None else request_timeout),
        max_retries=DEFAULT_MAX_RETRIES if max_retries is None else max_retries,
    )


# -- answers and errors -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reply:
    """A whole answer: status, headers and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def _sdk_request(request: ChatRequest) -> Any:
    return _sdk_http.Request("POST", request.url)


def _status_error(request: ChatRequest, reply: _Reply) -> Exception:
    """The exception langchain-openai raises for this status (the SDK's class, classified)."""
    try:
        body: object = json.loads(reply.body) if reply.body else None
    except ValueError:
        body = reply.body.decode("utf-8", "replace")
    message = f"Error code: {reply.status}" + (f" - {body}" if body else "")
    data = body.get("error", body) if isinstance(body, dict) else body
    response = _sdk_http.Response(
        reply.status,
        headers=list(reply.headers.items()),
        content=reply.body,
        request=_sdk_request(request),
    )
    status = reply.status
    if status == 400:
        overflow = any(marker in message for marker in _CONTEXT_OVERFLOW)
        kind = OpenAIContextOverflowError if overflow else OpenAIInvalidRequestError
        return kind(message, response=response, body=data)
    classes: dict[int, type[openai.APIStatusError]] = {
        401: OpenAIAuthenticationError,
        403: OpenAIPermissionDeniedError,
        404: OpenAIModelNotFoundError,
        409: openai.ConflictError,
        422: openai.UnprocessableEntityError,
        429: OpenAIRateLimitError,
    }
    kind_ = classes.get(status, OpenAIAPIError if status >= 500 else openai.APIStatusError)
    return kind_(message, response=response, body=data)


def _connection_error(request: ChatRequest, exc: BaseException) -> Exception:
    if isinstance(exc, TimeoutError):
        return OpenAITimeoutError(_sdk_request(request))
    return OpenAIConnectionError(message=f"Connection error: {exc}", request=_sdk_request(request))


def _answer(request: ChatRequest, reply: _Reply) -> dict[str, Any]:
    if reply.status >= 400:
        raise _status_error(request, reply)
    data = json.loads(reply.body)  # a body that is not JSON raises JSONDecodeError
    if not isinstance(data, dict):
        msg = f"The server answered with JSON that is not an object: {reply.body[:200]!r}"
        raise TypeError(msg)
    return data


def _retryable(exc: BaseException) -> bool:
    """What the SDK retries: connection errors and timeouts, 408, 409, 429 and 5xx (unless
    the server says ``x-should-retry``)."""
    if isinstance(exc, openai.APIConnectionError):
        return True
    if not isinstance(exc, openai.APIStatusError):
        return False
    should = exc.response.headers.get("x-should-retry")
    if should in ("true", "false"):
        return should == "true"
    return exc.status_code in (408, 409, 429) or exc.status_code >= 500


def _wait(state: RetryCallState) -> float:
    """The SDK's wait: what ``Retry-After`` asks (up to 60 s), else 0.5 s doubling up to
    8 s, less up to a quarter of jitter."""
    exc = state.outcome.exception() if state.outcome is not None else None
    asked = retry_after_s(exc) if exc is not None else None
    if asked is not None and 0 < asked <= 60:
        return asked
    backoff = min(0.5 * 2.0 ** (state.attempt_number - 1), 8.0)
    return backoff * (1 - 0.25 * random.random())


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float | None) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


async def apost(session: aiohttp.ClientSession, request: ChatRequest) -> dict[str, Any]:
    """Send ``request`` with ``session`` (with the SDK's retries); the answer's JSON object.

    A request is sent once per attempt: aiohttp re-sends no POST on a connection that broke,
    so a request the server may have received is retried only by the retry policy. A
    cancelled or timed-out request closes its connection, so the server sees the client go.
    """

    async def once() -> dict[str, Any]:
        try:
            async with session.post(
                request.url,
                data=request.body,
                headers=request.headers,
                timeout=_timeout(request.timeout),
            ) as response:
                reply = _Reply(response.status, response.headers, await response.read())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _connection_error(request, exc) from exc
        return _answer(request, reply)

    if request.max_retries <= 0:
        return await once()
    return await AsyncRetrying(
        stop=stop_after_attempt(request.max_retries + 1),
        retry=retry_if_exception(_retryable),
        wait=_wait,
        reraise=True,
    )(once)
