"""OpenTelemetry tracing for fusion-graph runs (install the ``otel`` extra).

One span per run (or subgraph phase), per candidate, per critique and per decision, with
the attributes of the OpenTelemetry GenAI semantic conventions, project-specific ones under
``fusion_graph.*``, and the OpenInference span kind that Arize Phoenix reads. Each span is
current while its step runs, so traces of the models called inside nest below it::

    fusion_graph.run                    CHAIN      n, strategy, decision, candidate counts
    ├── chat {model}                    LLM        one per candidate: seed, usage, error
    │   └── critique {model}            LLM        when a critic is configured
    └── fusion_graph.fuse | .select     LLM | EVALUATOR   decision, gen_ai.evaluation.result events

Content (the question, candidates, critiques, the answer) is recorded only when asked:
``capture_content=True`` or ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.

Example:
    >>> from fusion_graph.integrations.opentelemetry import configure_otlp
    >>> provider = configure_otlp("http://127.0.0.1:6006", project="demo")  # doctest: +SKIP
    >>> fusion_of_n(llm, n=4, fusor=llm).invoke("Hi")  # doctest: +SKIP
    >>> provider.force_flush()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from fusion_graph.hooks import CallInfo, RunHooks, RunInfo, RunReport, set_hooks
from fusion_graph.messages import message_text
from fusion_graph.types import (
    Candidate,
    Critique,
    Decision,
    ErrorInfo,
    Strategy,
    TokenUsage,
    usage_by_stage,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["CAPTURE_CONTENT_ENV", "FusionGraphInstrumentor", "OTelHooks", "configure_otlp"]

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
"""Set to ``true`` (or ``1``, ``yes``) to record prompts and replies on spans."""

Attributes = dict[str, AttributeValue]

# The context candidate spans hang from. Set inside a candidate scope so that candidates
# opened together (one multi-sample call) become siblings, not a chain of children.
_candidate_parent: ContextVar[otel_context.Context | None] = ContextVar(
    "fusion_graph_candidate_parent", default=None
)


class OTelHooks(RunHooks):
    """Run hooks that open an OpenTelemetry span around each scope of a run.

    Args:
        tracer: Where spans go.
        capture_content: Record the question, candidates, critiques and answer.
    """

    def __init__(self, tracer: Tracer, *, capture_content: bool = False) -> None:
        self.tracer = tracer
        self.capture_content = capture_content

    @contextmanager
    def run(self, info: RunInfo, report: RunReport) -> Iterator[None]:
        attributes: Attributes = {
            "gen_ai.operation.name": "invoke_workflow",
            "openinference.span.kind": "CHAIN",
            "fusion_graph.phase": info.phase,
            "fusion_graph.n": info.n,
            "fusion_graph.strategy": info.strategy,
            "fusion_graph.min_candidates": info.min_candidates,
            "fusion_graph.method": info.method,
            "fusion_graph.models": list(info.models),
        }
        if self.capture_content:
            attributes["input.value"] = _last_user_text(info.conversation)
        token = _candidate_parent.set(None)  # a run inside a candidate starts afresh
        try:
            with self._span(f"fusion_graph.{info.phase}", SpanKind.INTERNAL, attributes) as span:
                try:
                    yield
                finally:  # also on error: the candidates so far explain a failed quorum
                    self._end_run(span, report)
        finally:
            _candidate_parent.reset(token)

    @contextmanager
    def candidate(self, info: CallInfo) -> Iterator[Callable[[Candidate], None]]:
        attributes = _call_attributes(info, operation="chat")
        if info.seed is not None:
            attributes["gen_ai.request.seed"] = info.seed
        if info.temperature is not None:
            attributes["gen_ai.request.temperature"] = info.temperature
        parent = _candidate_parent.get() or otel_context.get_current()
        token = _candidate_parent.set(parent)
        try:
            with self._span(
                f"chat {info.model}", SpanKind.CLIENT, attributes, parent=parent
            ) as span:
                yield lambda candidate: self._end_candidate(span, candidate)
        finally:
            _candidate_parent.reset(token)

    @contextmanager
    def critique(self, info: CallInfo) -> Iterator[Callable[[Critique], None]]:
        attributes = _call_attributes(info, operation="chat")
        with self._span(f"critique {info.model}", SpanKind.CLIENT, attributes) as span:
            yield lambda critique: self._end_critique(span, critique)

    @contextmanager
    def decision(
        self, strategy: Strategy, method: str, candidates: Sequence[Candidate]
    ) -> Iterator[Callable[[Decision, AIMessage], None]]:
        attributes: Attributes = {
            "fusion_graph.strategy": strategy,
            "fusion_graph.method": method,
            "fusion_graph.candidates.count": len(candidates),
        }
        if strategy == "fusion":
            name, kind = "fusion_graph.fuse", SpanKind.CLIENT
            attributes["openinference.span.kind"] = "LLM"
            attributes["gen_ai.operation.name"] = "chat"
            attributes["gen_ai.request.model"] = method.removeprefix("fusion:")
        else:
            name, kind = "fusion_graph.select", SpanKind.INTERNAL
            attributes["openinference.span.kind"] = "EVALUATOR"
        with self._span(name, kind, attributes) as span:
            yield lambda decision, answer: self._end_decision(span, decision, answer)

    @contextmanager
    def _span(
        self,
        name: str,
        kind: SpanKind,
        attributes: Attributes,
        *,
        parent: otel_context.Context | None = None,
    ) -> Iterator[Span]:
        """A current span; an exception sets ``error.type`` and the ERROR status."""
        with self.tracer.start_as_current_span(
            name, context=parent, kind=kind, attributes=attributes
        ) as span:
            try:
                yield span
            except BaseException as exc:
                span.set_attribute("error.type", type(exc).__qualname__)
                raise  # start_as_current_span records it and sets the status

    def _end_run(self, span: Span, report: RunReport) -> None:
        if report.candidates:
            statuses = Counter(c.status for c in report.candidates)
            span.set_attribute("fusion_graph.candidates.succeeded", statuses["ok"])
            span.set_attribute("fusion_graph.candidates.failed", statuses["failed"])
            span.set_attribute("fusion_graph.candidates.cancelled", statuses["cancelled"])
        for stage, usage in usage_by_stage(report.candidates, report.decision).items():
            if usage is not None:
                span.set_attribute(f"fusion_graph.usage.{stage}.input_tokens", usage.input_tokens)
                span.set_attribute(f"fusion_graph.usage.{stage}.output_tokens", usage.output_tokens)
        if report.decision is not None:
            span.set_attributes(_decision_attributes(report.decision))
        if self.capture_content and report.answer is not None:
            span.set_attribute("output.value", message_text(report.answer))

    def _end_candidate(self, span: Span, candidate: Candidate) -> None:
        span.set_attributes(
            {
                "fusion_graph.candidate.latency_s": candidate.latency_s,
                "fusion_graph.candidate.attempts": candidate.attempts,
                **_usage_attributes(candidate.usage),
            }
        )
        if candidate.message is not None:
            span.set_attributes(_response_attributes(candidate.message))
        if candidate.error is not None:
            _set_error(span, candidate.error)
        elif self.capture_content:
            span.set_attribute("output.value", candidate.text)

    def _end_critique(self, span: Span, critique: Critique) -> None:
        span.set_attributes(_usage_attributes(critique.usage))
        if critique.score is not None:
            span.set_attribute("fusion_graph.critique.score", critique.score)
        if critique.error is not None:
            _set_error(span, critique.error)
        elif self.capture_content:
            span.set_attribute("output.value", critique.text)

    def _end_decision(self, span: Span, decision: Decision, answer: AIMessage) -> None:
        span.set_attributes({**_decision_attributes(decision), **_usage_attributes(decision.usage)})
        for index, score in sorted(decision.scores.items()):
            span.add_event(
                "gen_ai.evaluation.result",
                {
                    "gen_ai.evaluation.name": decision.method,
                    "gen_ai.evaluation.score.value": score,
                    "fusion_graph.candidate.index": index,
                },
            )
        if self.capture_content:
            span.set_attribute("output.value", message_text(answer))
            if decision.rationale:
                span.set_attribute("fusion_graph.decision.rationale", decision.rationale)


def _call_attributes(info: CallInfo, *, operation: str) -> Attributes:
    return {
        "gen_ai.operation.name": operation,
        "openinference.span.kind": "LLM",
        "gen_ai.request.model": info.model,
        "fusion_graph.candidate.index": info.index,
    }


def _usage_attributes(usage: TokenUsage | None) -> Attributes:
    if usage is None:
        return {}
    return {
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
    }


def _response_attributes(message: AIMessage) -> Attributes:
    """What the reply's metadata tells: finish reason, provider and served model."""
    meta = message.response_metadata
    attributes: Attributes = {}
    if isinstance(reason := meta.get("finish_reason"), str):
        attributes["gen_ai.response.finish_reasons"] = [reason]
    if isinstance(provider := meta.get("model_provider"), str):
        attributes["gen_ai.provider.name"] = provider
    if isinstance(model := meta.get("model_name"), str):
        attributes["gen_ai.response.model"] = model
    return attributes


def _decision_attributes(decision: Decision) -> Attributes:
    attributes: Attributes = {
        "fusion_graph.decision.method": decision.method,
        "fusion_graph.decision.fused": decision.fused,
        "fusion_graph.decision.fallback": decision.fallback,
    }
    if decision.selected_index is not None:
        attributes["fusion_graph.decision.selected_index"] = decision.selected_index
    if decision.score is not None:
        attributes["fusion_graph.decision.score"] = decision.score
    if decision.fallback_reason is not None:
        attributes["fusion_graph.decision.fallback_reason"] = decision.fallback_reason
    if decision.stopped is not None:
        attributes["fusion_graph.decision.stopped"] = decision.stopped
        attributes["fusion_graph.decision.stop_reason"] = decision.stop_reason or ""
    if decision.samples_used is not None:
        attributes["fusion_graph.decision.samples_used"] = decision.samples_used
    return attributes


def _set_error(span: Span, error: ErrorInfo) -> None:
    span.set_attribute("error.type", error.type)
    span.set_status(Status(StatusCode.ERROR, f"{error.type}: {error.message}"))


def _last_user_text(conversation: Sequence[BaseMessage]) -> str:
    users = [m for m in conversation if isinstance(m, HumanMessage)]
    last = users[-1] if users else (conversation[-1] if conversation else None)
    return message_text(last) if last is not None else ""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"true", "1", "yes"}


def _package_version() -> str | None:
    try:
        return version("fusion-graph")
    except PackageNotFoundError:
        return None


# BaseInstrumentor's module is untyped upstream (a file-level "type: ignore"): hence the ignores.
class FusionGraphInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Traces every fusion-graph run with OpenTelemetry.

    Registered under the ``opentelemetry_instrumentor`` entry point, so
    ``opentelemetry-instrument`` picks it up. Like every instrumentor it is a singleton:
    :meth:`uninstrument` before instrumenting again with other options.

    Example:
        >>> from opentelemetry.sdk.trace import TracerProvider
        >>> from fusion_graph.integrations.opentelemetry import FusionGraphInstrumentor
        >>> FusionGraphInstrumentor().instrument(tracer_provider=TracerProvider())
        >>> FusionGraphInstrumentor().uninstrument()
    """

    def instrument(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        capture_content: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """Start tracing runs.

        Args:
            tracer_provider: Where spans go (default: the global tracer provider).
            capture_content: Record prompts and replies on spans. ``None`` reads
                ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``; off by default.
        """
        super().instrument(
            tracer_provider=tracer_provider, capture_content=capture_content, **kwargs
        )

    def uninstrument(self, **kwargs: Any) -> None:
        """Stop tracing runs."""
        super().uninstrument(**kwargs)

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("fusion-graph",)

    def _instrument(self, **kwargs: Any) -> None:
        capture = kwargs.get("capture_content")
        tracer = trace.get_tracer(
            "fusion_graph", _package_version(), tracer_provider=kwargs.get("tracer_provider")
        )
        set_hooks(
            OTelHooks(
                tracer,
                capture_content=_env_flag(CAPTURE_CONTENT_ENV) if capture is None else capture,
            )
        )

    def _uninstrument(self, **kwargs: Any) -> None:
        set_hooks(None)


@dataclass
class TraceDelivery:
    """What the exporter of :func:`configure_otlp` managed to send (see
    :func:`trace_delivery`)."""

    endpoint: str
    """Where spans go (``"the OTEL_EXPORTER_OTLP endpoint"`` when taken from the variables)."""
    sent: int = 0
    """Spans the collector accepted."""
    failed: int = 0
    """Spans that could not be sent (after the exporter's own retries)."""
    error: str | None = None
    """Why the first failed batch failed, when the exporter said."""


_DELIVERIES: weakref.WeakKeyDictionary[Any, TraceDelivery] = weakref.WeakKeyDictionary()


def trace_delivery(provider: Any) -> TraceDelivery | None:
    """How many spans the provider made by :func:`configure_otlp` sent and failed to send
    (``None`` for any other provider). Read it after ``force_flush()``."""
    return _DELIVERIES.get(provider)


def _reporting(exporter: Any, delivery: TraceDelivery) -> Any:
    """``exporter`` that counts what it sent and failed to send, and says once, through the
    ``fusion_graph`` logger, that export failed (instead of the exporter's line per retry)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class ReportingExporter(SpanExporter):
        def export(self, spans: Any) -> Any:
            result = exporter.export(spans)
            if result is SpanExportResult.SUCCESS:
                delivery.sent += len(spans)
                return result
            if not delivery.failed:
                logging.getLogger("fusion_graph").warning(
                    "could not send traces to %s (is the collector running?)", delivery.endpoint
                )
            delivery.failed += len(spans)
            return result

        def shutdown(self) -> None:
            exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(exporter.force_flush(timeout_millis))

    return ReportingExporter()


def configure_otlp(
    endpoint: str | None = None,
    *,
    service_name: str = "fusion-graph",
    project: str | None = None,
    capture_content: bool | None = None,
    timeout: float = 5.0,
) -> TracerProvider:
    """Send fusion-graph traces over OTLP/HTTP: one line for a local Phoenix or collector.

    Builds a tracer provider that batches spans to an OTLP/HTTP endpoint, instruments
    fusion-graph with it (replacing an earlier instrumentation), and returns it. It is not
    made the global provider: call ``opentelemetry.trace.set_tracer_provider(provider)``
    for other instrumentations to use it too. Spans are sent in the background; call
    ``provider.force_flush()`` before reading them back (and at exit, which the provider
    does on its own).

    Args:
        endpoint: The collector's base URL, e.g. ``http://127.0.0.1:6006`` (``/v1/traces``
            is appended). ``None`` uses the standard ``OTEL_EXPORTER_OTLP_*`` variables.
        service_name: The ``service.name`` resource attribute.
        project: The Phoenix project (``openinference.project.name``); default "default".
        capture_content: As for :meth:`FusionGraphInstrumentor.instrument`.
        timeout: Seconds the exporter may spend on one batch, retries included: an
            unreachable collector costs at most this much at exit. Failures are counted
            (:func:`trace_delivery`) and reported once through the ``fusion_graph`` logger;
            the OTLP exporter's own line per retry is silenced.

    Example:
        >>> provider = configure_otlp("http://127.0.0.1:6006", project="demo")  # doctest: +SKIP
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource: Attributes = {"service.name": service_name}
    if project is not None:
        resource["openinference.project.name"] = project
    provider = TracerProvider(resource=Resource.create(resource))
    if endpoint is not None and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    delivery = TraceDelivery(endpoint=endpoint or "the OTEL_EXPORTER_OTLP endpoint")
    logging.getLogger("opentelemetry.exporter.otlp.proto.http").setLevel(logging.CRITICAL)
    exporter = _reporting(OTLPSpanExporter(endpoint=endpoint, timeout=timeout), delivery)
    # A large queue: the default (2048) drops spans when many runs finish at once.
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=8192))
    _DELIVERIES[provider] = delivery
    instrumentor = FusionGraphInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    instrumentor.instrument(tracer_provider=provider, capture_content=capture_content)
    return provider
