"""The proxy's traces: one SERVER span per request, ``POST /v1/chat/completions`` with its
HTTP attributes, the run's spans under it in the same trace, a caller's trace continued,
and nothing of the request's content or keys recorded. Spans go to an in-memory exporter;
the ``fusion-graph serve`` options that turn tracing on are checked without a collector.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from typer.testing import CliRunner

from fusion_graph.cli import app as cli_app
from fusion_graph.cli.tracing import finish_tracing, start_tracing, tracing_wanted
from fusion_graph.integrations.opentelemetry import FusionGraphInstrumentor
from tests.faults.fake_openai import FakeOpenAI, Fault, candidate
from tests.serve.conftest import FAKE_MODEL, RunningProxy, Serve, fake_spec

pytestmark = pytest.mark.server

SECRET_QUESTION = "What is the secret word, pineapple-7?"
QUESTION = [{"role": "user", "content": SECRET_QUESTION}]
KEY = "s3cret-proxy-key"
ROUTE = "/v1/chat/completions"


class Spans:
    """The spans a test's proxy made, finished ones only."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter = exporter

    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def servers(self, count: int = 1) -> list[ReadableSpan]:
        """The SERVER spans, once there are ``count``: a request's span ends just after its
        last byte is sent, so the client may have the answer a moment before."""
        deadline = time.monotonic() + 10
        while len(found := [s for s in self.all() if s.kind == SpanKind.SERVER]) < count:
            assert time.monotonic() < deadline, f"{len(found)} of {count} request spans"
            time.sleep(0.005)
        return found

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.all() if s.name == name]


@pytest.fixture
def traced(fake_openai: FakeOpenAI, serve: Serve) -> Iterator[tuple[RunningProxy, Spans]]:
    """A proxy in front of the fake upstream whose request spans and run spans go to one
    in-memory exporter (with an API key, to check it is never recorded)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = FusionGraphInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        proxy = serve(fake_spec(fake_openai), api_key=KEY, tracer_provider=provider)
        yield proxy, Spans(exporter)
    finally:
        instrumentor.uninstrument()


def post(proxy: RunningProxy, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{proxy.base_url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}", **headers},
        timeout=30,
    )


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def ancestors(span: ReadableSpan, spans: list[ReadableSpan]) -> list[ReadableSpan]:
    """``span``'s parent, its parent, ... as far as ``spans`` go."""
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    chain = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        chain.append(span)
    return chain


def recorded_text(spans: list[ReadableSpan]) -> str:
    parts: list[str] = []
    for span in spans:
        parts += [span.name, str(span.status.description)]
        parts += [str(v) for v in (span.attributes or {}).values()]
        for event in span.events:
            parts += [event.name, *(str(v) for v in (event.attributes or {}).values())]
    return "\n".join(parts)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_is_one_server_span_over_the_runs_spans(
    traced: tuple[RunningProxy, Spans], stream: bool
) -> None:
    proxy, spans = traced
    response = post(
        proxy, {"model": f"fusion-3/{FAKE_MODEL}", "messages": QUESTION, "stream": stream}
    )
    assert response.status_code == 200
    [server] = spans.servers()
    assert server.name == f"POST {ROUTE}"
    assert server.parent is None
    a = attrs(server)
    assert a["http.request.method"] == "POST"
    assert a["http.route"] == ROUTE
    assert a["url.path"] == ROUTE
    assert a["http.response.status_code"] == 200
    assert server.status.status_code == StatusCode.UNSET
    [run] = spans.named("fusion_graph.run")
    assert run.parent is not None and run.parent.span_id == server.context.span_id
    others = [s for s in spans.all() if s is not server]
    assert {s.name for s in others} >= {"fusion_graph.run", "fusion_graph.fuse", "chat fake"}
    for span in others:  # every span of the run hangs, through its parents, from the request
        assert span.context.trace_id == server.context.trace_id
        assert server in ancestors(span, spans.all())
    assert server.end_time >= max(s.end_time for s in others)  # streamed: it ends last
    assert not [s for s in spans.all() if s.name.startswith("fastapi.")]


def test_a_pass_through_is_one_server_span(traced: tuple[RunningProxy, Spans]) -> None:
    proxy, spans = traced
    assert post(proxy, {"model": FAKE_MODEL, "messages": QUESTION}).status_code == 200
    [server] = spans.servers()
    assert spans.all() == [server]
    assert server.kind == SpanKind.SERVER and server.name == f"POST {ROUTE}"
    assert attrs(server)["http.response.status_code"] == 200


def test_errors_carry_their_status(
    traced: tuple[RunningProxy, Spans], fake_openai: FakeOpenAI
) -> None:
    proxy, spans = traced
    assert post(proxy, {"model": "fusion-x/fake", "messages": QUESTION}).status_code == 400
    fake_openai.configure(rules=[(candidate, Fault.status(400))])
    assert post(proxy, {"model": "fusion-2/fake", "messages": QUESTION}).status_code == 502
    bad, failed = sorted(spans.servers(2), key=lambda s: s.start_time or 0)
    assert attrs(bad)["http.response.status_code"] == 400
    assert bad.status.status_code == StatusCode.UNSET  # a client's error, not the server's
    assert attrs(failed)["http.response.status_code"] == 502
    assert attrs(failed)["error.type"] == "502"
    assert failed.status.status_code == StatusCode.ERROR
    [run] = spans.named("fusion_graph.run")
    assert run.status.status_code == StatusCode.ERROR  # too few candidates, under the 502
    assert run.parent is not None and run.parent.span_id == failed.context.span_id


def test_a_callers_trace_is_continued(traced: tuple[RunningProxy, Spans]) -> None:
    proxy, spans = traced
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    traceparent = f"00-{trace_id}-{parent_id}-01"
    post(proxy, {"model": "fusion-2/fake", "messages": QUESTION}, traceparent=traceparent)
    [server] = spans.servers()
    assert server.parent is not None and server.parent.span_id == int(parent_id, 16)
    assert {s.context.trace_id for s in spans.all()} == {int(trace_id, 16)}


def test_no_content_and_no_key_is_recorded(traced: tuple[RunningProxy, Spans]) -> None:
    proxy, spans = traced
    assert httpx.get(f"{proxy.url}/health").status_code == 200
    for model, stream in [("fusion-2/fake", False), ("vote-2/fake", True), (FAKE_MODEL, True)]:
        post(proxy, {"model": model, "messages": QUESTION, "stream": stream})
    assert len(spans.servers(3)) == 3  # and none for the health probe
    text = recorded_text(spans.all())
    for secret in ("pineapple", KEY, "Bearer", "The fused answer", "Candidate for seed"):
        assert secret not in text


# --- fusion-graph serve's options ---------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "env", "expected"),
    [
        (None, {}, False),
        ("http://127.0.0.1:6006", {}, True),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        (
            None,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
            False,
        ),
        (
            None,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
            False,
        ),
        ("http://127.0.0.1:6006", {"OTEL_SDK_DISABLED": "true"}, True),
    ],
)
def test_tracing_is_on_with_an_endpoint_or_the_otel_variables(
    monkeypatch: pytest.MonkeyPatch, option: str | None, env: dict[str, str], expected: bool
) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tracing_wanted(option) is expected


def test_serve_help_documents_the_trace_options() -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--trace-endpoint" in result.output
    assert "--trace-project" in result.output
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in result.output


def test_the_commands_tracing_sends_each_request_over_otlp(
    otlp_receiver: tuple[str, list[tuple[str, bytes]]],
    fake_openai: FakeOpenAI,
    serve: Serve,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What ``fusion-graph serve --trace-endpoint URL`` sets up, against a loopback
    collector: the request's span and the run's, one trace, the service named by
    ``OTEL_SERVICE_NAME``."""
    url, received = otlp_receiver
    monkeypatch.setenv("OTEL_SERVICE_NAME", "proxy-under-test")
    provider = start_tracing(url, "serve-test")
    proxy = serve(fake_spec(fake_openai), tracer_provider=provider)
    response = httpx.post(
        f"{proxy.base_url}/chat/completions",
        json={"model": "fusion-2/fake", "messages": QUESTION},
        timeout=30,
    )
    assert response.status_code == 200
    proxy.stop()  # the request's span has ended once the server is down
    finish_tracing(provider)

    spans = []
    for path, body in received:
        assert path == "/v1/traces"
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource["service.name"] == "proxy-under-test"
            assert resource["openinference.project.name"] == "serve-test"
            spans += [s for scope in resource_spans.scope_spans for s in scope.spans]
    names = sorted(s.name for s in spans)
    assert names == [
        f"POST {ROUTE}",
        "chat fake",
        "chat fake",
        "fusion_graph.fuse",
        "fusion_graph.run",
    ]
    assert len({s.trace_id for s in spans}) == 1
