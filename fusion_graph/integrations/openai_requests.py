"""Chat-completions requests without the OpenAI SDK: the lean path of
:class:`~fusion_graph.integrations.openai_compat.ChatOpenAICompatible` for the calls
fusion-graph makes in bulk (candidates, judges, critics).

The SDK spends about 2 ms of CPU on a request with a JSON-schema ``response_format``
(it walks the schema against its typed parameters, then builds typed response objects that
langchain-openai dumps back to dicts). Here a request is the payload langchain-openai builds,
as JSON, over :mod:`~fusion_graph.integrations.http1`; the answer is parsed with ``json`` and
handed to langchain-openai's own ``_create_chat_result``. What the caller sees is the same:
the same messages and metadata, and on failure the same exception classes
(``langchain_openai``'s ``OpenAIRateLimitError``, ``OpenAIAPIError``,
``OpenAIConnectionError``, ``OpenAITimeoutError``, ...: subclasses of the ``openai`` ones),
retried like the SDK retries them (``max_retries``, default 2: connection errors, 408, 409,
429 and 5xx, waiting what ``Retry-After`` says or an exponential backoff).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

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
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from fusion_graph.integrations.http1 import AsyncOrigin, HttpReply, Origin, SyncOrigin
from fusion_graph.runtime import retry_after_s

try:  # the HTTP library the installed openai SDK builds its errors from
    import httpx2 as sdk_http  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - openai < 3
    import httpx as sdk_http  # type: ignore[no-redef,unused-ignore]

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "ChatRequest",
    "apost",
    "build_request",
    "post",
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
    """The full URL (for errors)."""
    origin: Origin
    target: str
    """Path and query."""
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
    url, origin, target = _route(base_url)
    if default_query or extra_query:
        query = urlencode({**(default_query or {}), **extra_query})
        target += ("&" if "?" in target else "?") + query
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Accept-Encoding": "identity",  # the client decodes no compression
    }
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if organization:
        headers["OpenAI-Organization"] = organization
    headers.update(default_headers or {})
    headers.update(extra_headers)
    return ChatRequest(
        url=url,
        origin=origin,
        target=target,
        headers=headers,
        body=json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
        timeout=_seconds(DEFAULT_TIMEOUT_S if request_timeout is None else request_timeout),
        max_retries=DEFAULT_MAX_RETRIES if max_retries is None else max_retries,
    )


@functools.lru_cache(maxsize=256)
def _route(base_url: str) -> tuple[str, Origin, str]:
    """The chat-completions URL of ``base_url``, its origin, and its path with any query."""
    url = base_url.rstrip("/") + "/chat/completions"
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return url, Origin.of(url), target


# -- answers and errors -----------------------------------------------------------------------


def _sdk_request(request: ChatRequest) -> Any:
    return sdk_http.Request("POST", request.url)


def _status_error(request: ChatRequest, reply: HttpReply) -> Exception:
    """The exception langchain-openai raises for this status (the SDK's class, classified)."""
    try:
        body: object = json.loads(reply.body) if reply.body else None
    except ValueError:
        body = reply.body.decode("utf-8", "replace")
    message = f"Error code: {reply.status}" + (f" - {body}" if body else "")
    data = body.get("error", body) if isinstance(body, dict) else body
    response = sdk_http.Response(
        reply.status, headers=reply.headers, content=reply.body, request=_sdk_request(request)
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


def _answer(request: ChatRequest, reply: HttpReply) -> dict[str, Any]:
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


def _retrying_options(request: ChatRequest) -> dict[str, Any]:
    return {
        "stop": stop_after_attempt(request.max_retries + 1),
        "retry": retry_if_exception(_retryable),
        "wait": _wait,
        "reraise": True,
    }


async def apost(origin: AsyncOrigin, request: ChatRequest) -> dict[str, Any]:
    """Send ``request`` on ``origin`` (with the SDK's retries); the answer's JSON object."""

    async def once() -> dict[str, Any]:
        try:
            reply = await origin.post(
                request.target, request.headers, request.body, timeout_s=request.timeout
            )
        except (OSError, TimeoutError) as exc:  # ProtocolError is a ConnectionError
            raise _connection_error(request, exc) from exc
        return _answer(request, reply)

    if request.max_retries <= 0:
        return await once()
    return await AsyncRetrying(**_retrying_options(request))(once)


def post(origin: SyncOrigin, request: ChatRequest) -> dict[str, Any]:
    """Blocking :func:`apost`."""

    def once() -> dict[str, Any]:
        try:
            reply = origin.post(
                request.target, request.headers, request.body, timeout_s=request.timeout
            )
        except (OSError, TimeoutError) as exc:
            raise _connection_error(request, exc) from exc
        return _answer(request, reply)

    if request.max_retries <= 0:
        return once()
    return Retrying(**_retrying_options(request))(once)
