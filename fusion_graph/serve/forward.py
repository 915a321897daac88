"""Raw pass-through: a request with a plain model name, to an OpenAI-compatible upstream
(an ``openai:`` or ``vllm:`` spec), goes to the upstream's ``/chat/completions`` as it came.

Only ``model`` is replaced (by the upstream's own model name) and the proxy's
``fusion_graph`` object is dropped; every other field (``n``, ``logprobs``, ``tools``,
``response_format``, ...) reaches the upstream, and its answer comes back untouched: the
status, the body's bytes (a stream's as they arrive) and the headers a client acts on
(``Content-Type``, ``Content-Encoding``, ``Retry-After``, rate limits, the request id). So
an upstream's 400 or 429 is the client's 400 or 429. When the upstream cannot be reached
or breaks off, the answer is a 502 (504 after the timeout) in OpenAI's error format; a
stream that breaks off after it started ends with an ``error`` event.

Requests go through one shared ``httpx.AsyncClient`` (kept-alive connections, replicas
taking turns), each holding a slot of its endpoint's limiter
(:mod:`fusion_graph.integrations.endpoint_limits`) for as long as it is in flight, as the
fan-outs' requests do. The embedded model, and upstreams given as LangChain chat models,
pass through the LangChain chat model instead.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response

from fusion_graph import __version__
from fusion_graph.integrations.endpoint_limits import EndpointLimiter, endpoint_limiter
from fusion_graph.models import ModelSpec
from fusion_graph.serve.connection import ResponseWithTurn, unless_disconnected
from fusion_graph.serve.errors import ServeError

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
"""The ``openai`` client's own default: ten minutes for an answer, five seconds to connect."""

_PASSED_HEADERS = frozenset(
    {
        "content-type",
        "content-encoding",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
        "x-request-id",
    }
)
"""The upstream's response headers a client acts on (and ``x-ratelimit-*``)."""


class Forwarder:
    """Forwards chat-completion bodies to an OpenAI-compatible server.

    Args:
        base_urls: The server's API root (``http://host:8000/v1``), or its replicas' (they
            take turns).
        model: The upstream's model name, which replaces the request's ``model``.
        api_key: Sent as ``Authorization: Bearer`` (none: no header).
        timeout: Seconds for the upstream's answer (a stream's: between two chunks).
        concurrency: The endpoint's limit on requests in flight (default: the endpoint's
            own, shared with every other caller in this process).
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        model: str,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        concurrency: int | None = None,
    ) -> None:
        urls = (base_urls,) if isinstance(base_urls, str) else tuple(base_urls)
        if not urls:
            msg = "a forwarder needs at least one base URL"
            raise ValueError(msg)
        if concurrency is not None and concurrency < 1:
            msg = f"a forwarder's concurrency must be at least 1, got {concurrency}"
            raise ValueError(msg)
        self.base_urls = tuple(url.rstrip("/") for url in urls)
        self.model = model
        self.concurrency = concurrency
        self._timeout = DEFAULT_TIMEOUT if timeout is None else httpx.Timeout(timeout)
        self._headers = {
            "content-type": "application/json",
            "user-agent": f"fusion-graph/{__version__}",
        }
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._turns = itertools.cycle(self.base_urls)
        self._lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_spec(cls, spec: ModelSpec, *, api_key_env: str = "OPENAI_API_KEY") -> Forwarder | None:
        """The forwarder of an ``openai:`` / ``vllm:`` spec (its URLs, model, ``timeout``,
        ``concurrency`` and ``api_key_env`` options); ``None`` for ``local``."""
        if spec.kind == "local" or spec.model is None:
            return None
        options = spec.options
        return cls(
            spec.urls,
            spec.model,
            api_key=os.environ.get(str(options.get("api_key_env", api_key_env))) or None,
            timeout=options.get("timeout"),
            concurrency=options.get("concurrency"),
        )

    def payload(self, body: Mapping[str, Any]) -> bytes:
        """The request body for the upstream: ``body`` with the upstream's ``model`` and
        without the proxy's ``fusion_graph`` object."""
        forwarded = {key: value for key, value in body.items() if key != "fusion_graph"}
        forwarded["model"] = self.model
        return json.dumps(forwarded, ensure_ascii=False, separators=(",", ":")).encode()

    async def open(self, payload: bytes, *, accept_encoding: str | None = None) -> UpstreamReply:
        """POST ``payload`` to the next replica; returns once the upstream's status and
        headers are in (its body is still to read).

        Raises:
            ServeError: the upstream could not be reached or did not answer in time.
        """
        with self._lock:
            url = next(self._turns)
        limiter = endpoint_limiter(url, self.concurrency)
        await limiter.aacquire()
        try:
            client = self._shared_client()
            headers = {**self._headers, "accept-encoding": accept_encoding or "identity"}
            request = client.build_request(
                "POST", f"{url}/chat/completions", content=payload, headers=headers
            )
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            limiter.release()
            raise _upstream_error(exc) from exc
        except BaseException:
            limiter.release()
            raise
        return UpstreamReply(response, limiter)

    async def aclose(self) -> None:
        """Close the shared client (and its kept-alive connections)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _shared_client(self) -> httpx.AsyncClient:
        """The client of the running event loop (connections belong to one loop)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            keep = sum(endpoint_limiter(url, self.concurrency).limit for url in self.base_urls)
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=keep)
            self._client = httpx.AsyncClient(timeout=self._timeout, limits=limits)
            self._loop = loop
        return self._client


class UpstreamReply:
    """The upstream's answer to one forwarded request, its body still to come; it holds the
    endpoint slot until :meth:`aclose`."""

    def __init__(self, response: httpx.Response, limiter: EndpointLimiter) -> None:
        self.response = response
        self._limiter: EndpointLimiter | None = limiter

    @property
    def status_code(self) -> int:
        return self.response.status_code

    def headers(self) -> dict[str, str]:
        """The response headers passed on to the client."""
        return {
            name: value
            for name, value in self.response.headers.items()
            if name in _PASSED_HEADERS or name.startswith("x-ratelimit-")
        }

    async def read(self) -> bytes:
        """The whole body, as sent (still encoded when the upstream compressed it).

        Raises:
            ServeError: the body broke off.
        """
        try:
            return b"".join([chunk async for chunk in self.response.aiter_raw()])
        except httpx.HTTPError as exc:
            raise _upstream_error(exc) from exc

    async def relay(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; an SSE ``error`` event if it breaks off."""
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            if self._is_plain_event_stream():
                body = _upstream_error(exc).body()
                yield b"\n\ndata: " + json.dumps(body).encode() + b"\n\n"

    async def aclose(self) -> None:
        """Close the response (its connection, if the body was not read to the end) and
        give the endpoint slot back; once, and also when the caller is being cancelled."""
        limiter, self._limiter = self._limiter, None
        if limiter is None:
            return
        try:
            with anyio.CancelScope(shield=True):
                await self.response.aclose()
        finally:
            limiter.release()

    def _is_plain_event_stream(self) -> bool:
        content_type = self.response.headers.get("content-type", "")
        encoding = self.response.headers.get("content-encoding", "identity")
        return bool(content_type.startswith("text/event-stream") and encoding == "identity")


async def forward(
    forwarder: Forwarder,
    body: Mapping[str, Any],
    request: Request,
    *,
    stream: bool,
    on_close: Callable[[], None],
) -> Response:
    """The upstream's answer to ``body`` as the client's response (see the module docs).

    A streamed answer with status 200 is relayed as it arrives (a
    :class:`~fusion_graph.serve.connection.ResponseWithTurn` calling ``on_close`` at its
    end); anything else is read whole first, and ``on_close`` is left to the caller.

    Raises:
        ClientDisconnected: the client went away before the upstream answered (the
            upstream request is cancelled).
        ServeError: the upstream could not be reached, timed out or broke off.
    """
    payload = forwarder.payload(body)
    accept_encoding = request.headers.get("accept-encoding")
    if not stream:
        status, headers, content = await unless_disconnected(
            request, _whole_answer(forwarder, payload, accept_encoding)
        )
        return Response(content, status_code=status, headers=headers)
    reply = await unless_disconnected(
        request, forwarder.open(payload, accept_encoding=accept_encoding)
    )
    if reply.status_code == 200:
        return ResponseWithTurn(
            reply.relay(),
            on_close=on_close,
            release=reply.aclose,
            status_code=200,
            headers=reply.headers(),
        )
    try:  # an error instead of a stream: its body whole, with its status
        content = await unless_disconnected(request, reply.read())
    finally:
        await reply.aclose()
    return Response(content, status_code=reply.status_code, headers=reply.headers())


async def _whole_answer(
    forwarder: Forwarder, payload: bytes, accept_encoding: str | None
) -> tuple[int, dict[str, str], bytes]:
    reply = await forwarder.open(payload, accept_encoding=accept_encoding)
    try:
        return reply.status_code, reply.headers(), await reply.read()
    finally:
        await reply.aclose()


def _upstream_error(exc: httpx.HTTPError) -> ServeError:
    kind = type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        message = f"the upstream could not be reached: {kind}"
        return ServeError(502, message, type="upstream_error", code="upstream_unreachable")
    if isinstance(exc, httpx.TimeoutException):
        message = f"the upstream did not answer in time: {kind}"
        return ServeError(504, message, type="upstream_error", code="upstream_timeout")
    message = f"the upstream's answer broke off: {kind}"
    return ServeError(502, message, type="upstream_error", code="upstream_incomplete")
