"""``fusion-graph serve``: the OpenAI-compatible proxy (:mod:`fusion_graph.serve`) on
uvicorn, in front of one upstream model spec.

It binds loopback by default. A non-loopback ``--host`` needs ``--api-key-env``: the
server then requires ``Authorization: Bearer <key>`` on every ``/v1`` request. Keys and
request content are never printed or logged, nor traced (content only when
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`` asks for it).

Tracing (the ``otel`` extra) is on with ``--trace-endpoint URL``, or when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` variables name a
collector: each request is one SERVER span with the run's spans under it, sent over
OTLP/HTTP by :func:`~fusion_graph.integrations.opentelemetry.configure_otlp`.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated

import typer
from rich.markup import escape

from fusion_graph.cli.errors import CliError, err
from fusion_graph.cli.tracing import finish_tracing, start_tracing, tracing_wanted
from fusion_graph.models import SPEC_HELP, ModelSpec
from fusion_graph.serve import ServeLimits, Upstream, create_app


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_key(api_key_env: str | None, host: str) -> str | None:
    if api_key_env is None:
        if not is_loopback_host(host):
            msg = (
                f"Refusing to serve on {host} without an API key: anyone who can reach it "
                "could use the upstream. Pass --api-key-env NAME (the variable holding the key "
                "clients must send as 'Authorization: Bearer <key>'), or bind 127.0.0.1."
            )
            raise CliError(msg, code=2)
        return None
    key = os.environ.get(api_key_env, "")
    if not key.strip():
        msg = f"--api-key-env {api_key_env}: the variable is not set (or empty)."
        raise CliError(msg, code=2)
    return key.strip()


def serve(
    upstream: Annotated[str, typer.Option(help=f"The upstream model spec. {SPEC_HELP}")] = "local",
    host: Annotated[
        str,
        typer.Option(help="Address to bind. Anything but loopback needs --api-key-env."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="Environment variable holding the key clients must send as "
            "'Authorization: Bearer <key>' (required for a non-loopback --host)."
        ),
    ] = None,
    max_n: Annotated[
        int, typer.Option(min=1, max=256, help="Most candidates a request may ask for.")
    ] = 16,
    default_n: Annotated[
        int, typer.Option(min=1, max=256, help="Candidates when a request names none.")
    ] = 4,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Most max_tokens a request may ask for, per call.")
    ] = 1024,
    default_max_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="Tokens per call when a request does not say (a plain model name to an "
            "openai: or vllm: upstream goes up as it came).",
        ),
    ] = 256,
    max_in_flight: Annotated[
        int, typer.Option(min=1, help="Requests served at once; more wait in the queue.")
    ] = 64,
    max_queue: Annotated[
        int,
        typer.Option(min=0, help="Requests that may wait; beyond that: 429 with Retry-After."),
    ] = 64,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body in bytes (413 above).")
    ] = 1_000_000,
    min_candidates: Annotated[
        int,
        typer.Option(min=1, help="Quorum: fewer successful candidates is a 502 with causes."),
    ] = 1,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Sampling temperature when a request gives none.")
    ] = 0.7,
    graceful_shutdown_s: Annotated[
        int,
        typer.Option(min=0, help="On Ctrl-C / SIGTERM, seconds to let requests finish."),
    ] = 30,
    log_level: Annotated[
        str, typer.Option(help="uvicorn's log level (critical, error, warning, info, debug).")
    ] = "info",
    trace_endpoint: Annotated[
        str | None,
        typer.Option(
            help="Trace every request over OTLP/HTTP to this base URL, e.g. "
            "http://127.0.0.1:6006 for Phoenix (needs the otel extra): one SERVER span per "
            "request, the run's spans under it, no content or keys. Without it, tracing is on when "
            "OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set."
        ),
    ] = None,
    trace_project: Annotated[
        str | None, typer.Option(help="Project name for Phoenix (openinference.project.name).")
    ] = None,
) -> None:
    """Serve Best-of-N and Fusion-of-N behind an OpenAI-compatible API.

    POST /v1/chat/completions (JSON and stream: true), GET /v1/models, GET /health. The
    request's model picks the strategy: fusion-4/MODEL, bon-8-judge/MODEL, bon-4-vote/MODEL,
    vote-5/MODEL (append -critic to critique each candidate); a plain MODEL passes through
    (one upstream call; to an openai: or vllm: upstream the request goes up raw and its
    answer comes back untouched, n and logprobs included). Or send {"fusion_graph":
    {"strategy", "n", "selector", "critic"}} in the body (the openai client's extra_body).
    """
    import uvicorn

    try:
        key = _api_key(api_key_env, host)
        limits = ServeLimits(
            max_n=max_n,
            default_n=default_n,
            max_tokens=max_tokens,
            max_body_bytes=max_body_bytes,
            max_in_flight=max_in_flight,
            max_queue=max_queue,
            min_candidates=min_candidates,
        )
        spec = ModelSpec.parse(upstream)
        served = Upstream.from_spec(
            spec,
            max_tokens=min(default_max_tokens, max_tokens),
            temperature=temperature,
            min_candidates=min_candidates,
        )
        provider = (
            start_tracing(trace_endpoint, trace_project) if tracing_wanted(trace_endpoint) else None
        )
    except CliError as exc:
        err.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.code) from None
    except ValueError as exc:
        err.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except (ImportError, FileNotFoundError) as exc:
        err.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    app = create_app(served, limits=limits, api_key=key, tracer_provider=provider)
    names = ", ".join(served.names)
    auth = "Bearer key required" if key else "no API key"
    traced = ", traced" if provider is not None else ""
    err.print(f"Serving {escape(names)} on http://{host}:{port}/v1 ({auth}{traced})")
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=graceful_shutdown_s,
        )
    finally:
        if provider is not None:
            finish_tracing(provider)
