"""Tracing for the commands: start an OTLP exporter, flush it at the end, and say once,
in a sentence, if spans could not be sent."""

from __future__ import annotations

import os
from typing import Any

from rich.markup import escape

from fusion_graph.cli.errors import CliError, err

_OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracing_wanted(trace_endpoint: str | None) -> bool:
    """Whether to trace: ``--trace-endpoint`` was given, or a standard OTLP endpoint
    variable is set (unless ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``)."""
    if trace_endpoint:
        return True
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(os.environ.get(name, "").strip() for name in _OTLP_ENDPOINT_VARIABLES)


def start_tracing(
    endpoint: str | None,
    project: str | None,
    *,
    what: str = "Tracing",
    service_name: str | None = None,
) -> Any:
    """The tracer provider of a command (``what`` names the option in the error shown
    when the OpenTelemetry extra is missing). ``service_name`` defaults to
    ``OTEL_SERVICE_NAME``, else ``fusion-graph``."""
    if service_name is None:
        service_name = os.environ.get("OTEL_SERVICE_NAME", "").strip() or "fusion-graph"
    try:
        from fusion_graph.integrations.opentelemetry import configure_otlp
    except ImportError as exc:
        msg = f"{what} needs the OpenTelemetry extra: `pip install 'fusion-graph[otel]'`."
        raise CliError(msg, code=2) from exc
    return configure_otlp(endpoint, service_name=service_name, project=project)


def finish_tracing(provider: Any, *, lost: str = "Traces were lost") -> None:
    """Send the spans still queued and say once, in a sentence, if some could not be sent
    (``lost`` opens that sentence)."""
    from fusion_graph.integrations.opentelemetry import trace_delivery

    provider.force_flush()
    provider.shutdown()
    delivery = trace_delivery(provider)
    if delivery is not None and delivery.failed:
        err.print(
            f"[yellow]{lost}:[/] {escape(delivery.endpoint)} did not accept "
            f"{delivery.failed} span(s). Is the collector running (e.g. Phoenix on :6006)?"
        )
