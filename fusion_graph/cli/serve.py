"""``fusion-graph serve``: the OpenAI-compatible proxy (:mod:`fusion_graph.serve`) on
uvicorn, in front of one upstream model spec.

It binds loopback by default. A non-loopback ``--host`` needs ``--api-key-env``: the
server then requires ``Authorization: Bearer <key>`` on every ``/v1`` request. Keys and
request content are never printed or logged.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated

import typer
from rich.markup import escape

from fusion_graph.cli.errors import CliError, err
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
        int, typer.Option(min=1, help="Tokens per call when a request does not say.")
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
) -> None:
    """Serve Best-of-N and Fusion-of-N behind an OpenAI-compatible API.

    POST /v1/chat/completions (JSON and stream: true), GET /v1/models, GET /health. The
    request's model picks the strategy: fusion-4/MODEL, bon-8-judge/MODEL, bon-4-vote/MODEL,
    vote-5/MODEL (append -critic to critique each candidate); a plain MODEL passes through
    (one upstream call). Or send {"fusion_graph": {"strategy", "n", "selector", "critic"}}
    in the body (the openai client's extra_body).
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
    except CliError as exc:
        err.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.code) from None
    except ValueError as exc:
        err.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except (ImportError, FileNotFoundError) as exc:
        err.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    app = create_app(served, limits=limits, api_key=key)
    names = ", ".join(served.names)
    auth = "Bearer key required" if key else "no API key"
    err.print(f"Serving {escape(names)} on http://{host}:{port}/v1 ({auth})")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_shutdown_s,
    )
