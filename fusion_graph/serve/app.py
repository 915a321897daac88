"""The OpenAI-compatible ASGI app: ``POST /v1/chat/completions``, ``GET /v1/models`` and
``GET /health`` in front of one upstream, with Fusion-of-N and Best-of-N per request.

Mount it in your own ASGI server, or run it with ``fusion-graph serve``. A request's
strategy comes from its model name and its ``fusion_graph`` object
(:mod:`fusion_graph.serve.strategy`); a plain model name passes through: one upstream call,
forwarded raw to an OpenAI-compatible upstream (:mod:`fusion_graph.serve.forward`), through
the chat model otherwise. Each request takes a turn of the server's admission control
before it calls the upstream (429 when full), and its upstream work is cancelled when the
client goes away.

Traced, when a tracer provider is given (or set globally): each ``/v1`` request is one
OpenTelemetry span of kind SERVER, ``POST /v1/chat/completions``, made by FastAPI's own
telemetry (HTTP attributes: method, route, path, status code; a caller's ``traceparent`` is
continued), with the run's spans (:mod:`fusion_graph.integrations.opentelemetry`) under
it. The request's span records no header, body or key (the run's record content only when
asked); ``/health`` is not traced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from fusion_graph.models import ModelSpec
from fusion_graph.serve.admission import Admission, Overloaded, Turn
from fusion_graph.serve.connection import ClientDisconnected, ResponseWithTurn, unless_disconnected
from fusion_graph.serve.errors import ServeError, bad_request, upstream_failure
from fusion_graph.serve.forward import Forwarder, forward
from fusion_graph.serve.guards import BearerAuth, BodySizeLimit
from fusion_graph.serve.limits import ServeLimits
from fusion_graph.serve.openai_format import ChatCompletionRequest, completion_body, completion_id
from fusion_graph.serve.report import pass_through_report, run_report
from fusion_graph.serve.strategy import StrategyChoice, StrategyError, choose_strategy
from fusion_graph.serve.streaming import (
    StreamedAnswer,
    fusion_producer,
    pass_through_producer,
)
from fusion_graph.serve.upstream import Upstream
from fusion_graph.types import TokenUsage
from fusion_graph.wrap import FusionRunnable

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

logger = logging.getLogger("fusion_graph.serve")


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: its strategy, conversation and what will answer it."""

    choice: StrategyChoice
    conversation: list[BaseMessage]
    target: FusionRunnable | Runnable[Any, Any]
    """The fusion / Best-of-N runnable, or the upstream model for a pass-through, with the
    request's call options and tools bound."""


def create_app(
    upstream: Upstream | ModelSpec | str | BaseChatModel | Sequence[BaseChatModel],
    *,
    limits: ServeLimits | None = None,
    api_key: str | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """The proxy's ASGI app.

    Args:
        upstream: What answers: an :class:`Upstream`, a model spec (``"local"``,
            ``"openai:URL:MODEL"``, ``"vllm:URL:MODEL"``, replicas joined with ``+``), or
            a LangChain chat model (or its replicas).
        limits: Server-side defaults and limits (:class:`ServeLimits`).
        api_key: When set, every ``/v1`` request must send ``Authorization: Bearer
            <api_key>``.
        tracer_provider: Where each request's SERVER span goes (default: the global
            tracer provider; no spans while none is set). The run's spans under it come
            from fusion-graph's instrumentation
            (:class:`~fusion_graph.integrations.opentelemetry.FusionGraphInstrumentor`,
            which :func:`~fusion_graph.integrations.opentelemetry.configure_otlp` sets up).

    Example:
        >>> app = create_app("local")  # doctest: +SKIP
        >>> # uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    limits = limits or ServeLimits()
    served = _as_upstream(upstream, limits)
    admission = Admission(max_in_flight=limits.max_in_flight, max_queue=limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if served.forwarder is not None:  # its kept-alive connections
            await served.forwarder.aclose()

    app = FastAPI(
        title="fusion-graph",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        telemetry={
            "tracer_provider": tracer_provider,
            # The run's spans hang from the request's span itself, not from FastAPI's
            # endpoint span (which ends before a streamed answer does).
            "operation_spans": False,
            # FastAPI's log records carry exception messages: nothing of a request leaves
            # the proxy unless asked.
            "logs": False,
            "exclude": _untraced,
        },
    )
    app.state.upstream = served
    app.state.admission = admission
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(BearerAuth, api_key=api_key)  # outermost: no key, no body read

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await serve_error(request, _validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = ServeError(exc.status_code, str(exc.detail), type=kind)
        return await serve_error(request, error)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and how busy the server is."""
        return {
            "status": "ok",
            "upstream": served.name,
            "in_flight": admission.in_flight,
            "waiting": admission.waiting,
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The upstream's names, and one example per strategy family."""
        n = limits.default_n
        ids = [
            *served.names,
            f"fusion-{n}/{served.name}",
            f"bon-{n}-judge/{served.name}",
            f"vote-{n}/{served.name}",
        ]
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "fusion-graph"} for i in ids]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """A chat completion, passed through or made by Fusion-of-N / Best-of-N."""
        choice = _choose(body, served, limits)
        answerer: Forwarder | PreparedRequest
        if choice.kind == "pass_through" and served.forwarder is not None:
            answerer = served.forwarder  # the raw body goes up, the raw answer comes back
        else:
            answerer = _prepare(body, choice, served)
        turn = await _enter(admission, limits)
        response: Response | None = None
        try:
            if isinstance(answerer, Forwarder):
                raw = await request.json()  # as FastAPI parsed it: every field, kept
                response = await forward(
                    answerer, raw, request, stream=body.stream, on_close=turn.leave
                )
            elif body.stream:
                response = await _stream(answerer, body, request, on_close=turn.leave)
            else:
                response = await _complete(answerer, request)
            return response
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening; nothing is sent
        except (ServeError, asyncio.CancelledError):
            raise
        except Exception as exc:
            error = upstream_failure(exc)
            if error.status >= 500 and error.code is None:
                logger.error("request failed: %s", type(exc).__name__)  # no content, no keys
            raise error from exc
        finally:
            if not isinstance(response, ResponseWithTurn):  # a stream gives it back itself
                turn.leave()

    return app


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    """Health probes make no spans."""
    return bool(scope.get("path") == "/health")


def _as_upstream(
    upstream: Upstream | ModelSpec | str | BaseChatModel | Sequence[BaseChatModel],
    limits: ServeLimits,
) -> Upstream:
    if isinstance(upstream, Upstream):
        return upstream
    if isinstance(upstream, str | ModelSpec):
        return Upstream.from_spec(
            upstream, max_tokens=min(256, limits.max_tokens), min_candidates=limits.min_candidates
        )
    return Upstream(upstream, min_candidates=limits.min_candidates)


def _validation_error(exc: RequestValidationError) -> ServeError:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    message = f"invalid request body: {first.get('msg', 'malformed')}"
    if param:
        message += f" (at {param})"
    return bad_request(message, param=param)


def _choose(body: ChatCompletionRequest, upstream: Upstream, limits: ServeLimits) -> StrategyChoice:
    """The strategy of ``body``, checked against the limits and the upstream (400/404)."""
    max_tokens = body.requested_max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        msg = f"max_tokens must be at most {limits.max_tokens} on this server, got {max_tokens}"
        raise bad_request(msg, param="max_tokens")
    overrides = body.fusion_graph.overrides() if body.fusion_graph is not None else None
    try:
        choice = choose_strategy(
            body.model,
            overrides,
            max_n=limits.max_n,
            default_strategy=limits.default_strategy,
            default_n=limits.default_n,
        )
    except StrategyError as exc:
        raise bad_request(str(exc), param=exc.param) from None
    if not upstream.serves(choice.upstream_model):
        msg = (
            f"The model {choice.upstream_model!r} does not exist here; this server serves "
            f"{', '.join(map(repr, upstream.names))}, as it is or behind a strategy "
            f"(fusion-4/{upstream.name}, bon-4-judge/{upstream.name}, vote-4/{upstream.name})."
        )
        raise ServeError(
            404, msg, type="invalid_request_error", param="model", code="model_not_found"
        )
    if choice.kind == "pass_through" and upstream.forwarder is not None:
        if body.n > limits.max_n:  # the upstream makes the n choices
            msg = f"n must be at most {limits.max_n} on this server, got {body.n}"
            raise bad_request(msg, param="n")
    elif body.n != 1:
        msg = "n must be 1 (ask for candidates with a strategy: fusion-N/MODEL or fusion_graph.n)"
        raise bad_request(msg, param="n")
    return choice


async def _enter(admission: Admission, limits: ServeLimits) -> Turn:
    """A turn of the admission control (429 with ``Retry-After`` when full)."""
    try:
        return await admission.enter()
    except Overloaded as exc:
        headers = {"Retry-After": str(limits.retry_after_s)}
        raise ServeError(
            429, f"{exc}; retry later", type="rate_limit_error", code="overloaded", headers=headers
        ) from None


def _prepare(
    body: ChatCompletionRequest, choice: StrategyChoice, upstream: Upstream
) -> PreparedRequest:
    """Bind what will answer ``body`` through LangChain (400 if refused)."""
    try:
        conversation = body.conversation()
    except (ValueError, TypeError, KeyError) as exc:
        msg = f"invalid messages: {exc}"
        raise bad_request(msg, param="messages") from None
    options = body.call_options()
    tool_options: dict[str, Any] = {}
    if body.tool_choice is not None:
        tool_options["tool_choice"] = body.tool_choice
    target: FusionRunnable | Runnable[Any, Any]
    try:
        if choice.kind == "pass_through":
            replica = upstream.next_model()
            model: Runnable[Any, Any] = replica
            if body.tools:
                model = replica.bind_tools(body.tools, **tool_options)
            target = model.bind(**options) if options else model
        else:
            fused = upstream.runnable(choice).bind(**options)
            target = fused.bind_tools(body.tools, **tool_options) if body.tools else fused
    except (ValueError, TypeError) as exc:
        msg = f"the request's options or tools were refused: {exc}"
        raise bad_request(msg) from None
    return PreparedRequest(choice, conversation, target)


async def _complete(prepared: PreparedRequest, request: Request) -> JSONResponse:
    choice, target = prepared.choice, prepared.target
    if isinstance(target, FusionRunnable):
        result = await unless_disconnected(request, target.arun(prepared.conversation))
        message, usage, report = result.message, result.usage, run_report(choice, result)
    else:
        reply = await unless_disconnected(request, target.ainvoke(prepared.conversation))
        message = reply if isinstance(reply, AIMessage) else AIMessage(content=str(reply))
        usage = TokenUsage.of(message)
        report = pass_through_report(choice, usage)
    body = completion_body(
        message, id=completion_id(), model=choice.model_name, usage=usage, extension=report
    )
    return JSONResponse(body)


async def _stream(
    prepared: PreparedRequest,
    body: ChatCompletionRequest,
    request: Request,
    *,
    on_close: Callable[[], None],
) -> Response:
    choice, target = prepared.choice, prepared.target
    if isinstance(target, FusionRunnable):
        producer = fusion_producer(target, prepared.conversation, choice)
    else:
        producer = pass_through_producer(target, prepared.conversation, choice)
    answer = StreamedAnswer(producer)
    try:
        await unless_disconnected(request, answer.started())
    except BaseException:
        answer.cancel()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = answer.sse(id=completion_id(), model=choice.model_name, include_usage=include_usage)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return ResponseWithTurn(
        events, on_close=on_close, media_type="text/event-stream", headers=headers
    )
