"""OpenTelemetry tracing: the span tree, its attributes and events, nesting under the
caller's span in sync and async mode, the subgraph phases, privacy by default, and the
OTLP helper (against a loopback receiver)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fusion_graph import (
    LLMJudge,
    MajorityVote,
    NotEnoughCandidatesError,
    PairwiseJudge,
    best_of_n,
    create_fusion_graph,
    fusion_of_n,
)
from fusion_graph.hooks import RunHooks, current_hooks
from fusion_graph.integrations.opentelemetry import (
    CAPTURE_CONTENT_ENV,
    FusionGraphInstrumentor,
    OTelHooks,
    configure_otlp,
)
from fusion_graph.testing import FakeCall, FakeChatModel
from fusion_graph.types import Strategy
from tests.conftest import Mode

ANSWERS = ["Paris", "Lyon", "Paris, on the Seine"]


@dataclass
class Tracing:
    """The spans one test produced."""

    exporter: InMemorySpanExporter
    provider: TracerProvider

    def spans(self, prefix: str = "") -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name.startswith(prefix)]

    def one(self, name: str) -> ReadableSpan:
        [span] = [s for s in self.exporter.get_finished_spans() if s.name == name]
        return span

    def candidates(self, model: str = "fake-chat") -> list[ReadableSpan]:
        found = self.spans(f"chat {model}")
        return sorted(found, key=lambda s: attrs(s)["fusion_graph.candidate.index"])


@pytest.fixture
def instrument() -> Iterator[Callable[..., Tracing]]:
    """Instruments with a fresh provider and in-memory exporter; uninstruments after."""
    instrumentor = FusionGraphInstrumentor()

    def start(**kwargs: Any) -> Tracing:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        instrumentor.instrument(tracer_provider=provider, **kwargs)
        return Tracing(exporter, provider)

    yield start
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


@pytest.fixture
def tracing(instrument: Callable[..., Tracing]) -> Tracing:
    return instrument()


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def evaluations(span: ReadableSpan) -> dict[int, float]:
    """The ``gen_ai.evaluation.result`` events of a span, as ``{index: score}``."""
    found: dict[int, float] = {}
    for event in span.events:
        if event.name == "gen_ai.evaluation.result":
            event_attrs: dict[str, Any] = dict(event.attributes or {})
            index = event_attrs["fusion_graph.candidate.index"]
            found[index] = event_attrs["gen_ai.evaluation.score.value"]
    return found


def every_recorded_text(spans: Sequence[ReadableSpan]) -> str:
    """Names, attribute values, events and statuses of the spans, as one string."""
    parts: list[str] = []
    for span in spans:
        parts += [span.name, str(span.status.description)]
        parts += [str(v) for v in (span.attributes or {}).values()]
        for event in span.events:
            parts += [event.name, *(str(v) for v in (event.attributes or {}).values())]
    return "\n".join(parts)


class ReportingFake(FakeChatModel):
    """A fake whose replies carry a finish reason and a provider, like real chat models."""

    def _reply(self, call: FakeCall) -> AIMessage:
        message = super()._reply(call)
        message.response_metadata.update(finish_reason="stop", model_provider="openai")
        return message


def _fail_on(indices: set[int]) -> Callable[[FakeCall], str | Exception]:
    def reply(call: FakeCall) -> str | Exception:
        assert call.index is not None
        return RuntimeError(f"boom {call.index}") if call.index in indices else ANSWERS[call.index]

    return reply


# --- the span tree -----------------------------------------------------------------------


def test_fusion_span_tree(mode: Mode, tracing: Tracing) -> None:
    gen = ReportingFake(replies=ANSWERS, model_name="gen")
    fusor = FakeChatModel(replies=["Paris is the capital."], model_name="fusor")
    fused = fusion_of_n(gen, n=3, fusor=fusor, seed=7, temperature=0.5, min_candidates=2)

    mode.invoke(fused, "What is the capital of France?")

    run, fuse = tracing.one("fusion_graph.run"), tracing.one("fusion_graph.fuse")
    candidates = tracing.candidates("gen")
    assert len(tracing.spans()) == 5
    assert run.parent is None and run.kind == SpanKind.INTERNAL
    assert attrs(run) == {
        "gen_ai.operation.name": "invoke_workflow",
        "openinference.span.kind": "CHAIN",
        "fusion_graph.phase": "run",
        "fusion_graph.n": 3,
        "fusion_graph.strategy": "fusion",
        "fusion_graph.min_candidates": 2,
        "fusion_graph.method": "fusion:fusor",
        "fusion_graph.models": ("gen",),
        "fusion_graph.candidates.succeeded": 3,
        "fusion_graph.candidates.failed": 0,
        "fusion_graph.candidates.cancelled": 0,
        # Token usage per stage (the fakes count words).
        "fusion_graph.usage.candidates.input_tokens": 18,
        "fusion_graph.usage.candidates.output_tokens": 6,
        "fusion_graph.usage.decision.input_tokens": 166,
        "fusion_graph.usage.decision.output_tokens": 4,
        "fusion_graph.decision.method": "fusion:fusor",
        "fusion_graph.decision.fused": True,
        "fusion_graph.decision.fallback": False,
    }
    for i, span in enumerate(candidates):
        assert parent_id(span) == span_id(run)
        assert span.kind == SpanKind.CLIENT
        assert span.status.status_code == StatusCode.UNSET
        a = attrs(span)
        assert a["gen_ai.operation.name"] == "chat"
        assert a["openinference.span.kind"] == "LLM"
        assert a["gen_ai.request.model"] == "gen"
        assert a["gen_ai.provider.name"] == "openai"
        assert a["gen_ai.response.finish_reasons"] == ("stop",)
        assert a["fusion_graph.candidate.index"] == i
        assert a["gen_ai.request.seed"] == 7 + i
        assert a["gen_ai.request.temperature"] == 0.5
        assert a["gen_ai.usage.input_tokens"] > 0
        assert a["gen_ai.usage.output_tokens"] == len(ANSWERS[i].split())
        assert a["fusion_graph.candidate.attempts"] == 1
        assert a["fusion_graph.candidate.latency_s"] >= 0
    assert parent_id(fuse) == span_id(run)
    assert fuse.kind == SpanKind.CLIENT
    a = attrs(fuse)
    assert a["openinference.span.kind"] == "LLM"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "fusor"
    assert a["fusion_graph.decision.fused"] is True
    assert "fusion_graph.decision.selected_index" not in a
    assert a["gen_ai.usage.output_tokens"] == 4
    assert {s.context.trace_id for s in tracing.spans() if s.context} == {run.context.trace_id}


def _judge_by_candidate(call: FakeCall) -> str:
    """Scores a candidate by which answer it sees: 'Lyon' 9, others by length."""
    text = call.messages[-1].content
    for i, answer in sorted(enumerate(ANSWERS), key=lambda p: -len(p[1])):
        if answer in str(text):
            return f'{{"score": {9 if answer == "Lyon" else i + 2}, "rationale": "because"}}'
    return "no idea"


SELECTORS: dict[str, Callable[[], Any]] = {
    "llm_judge": lambda: LLMJudge(FakeChatModel(replies=_judge_by_candidate, model_name="j")),
    "pairwise_judge": lambda: PairwiseJudge(FakeChatModel(replies=["Winner: B"])),
    "majority_vote": lambda: MajorityVote(),
    "reward": lambda: lambda messages, candidate: float(len(candidate.text)),
}


@pytest.mark.parametrize("selector", list(SELECTORS))
def test_best_of_n_span_tree_and_evaluation_events(
    mode: Mode, tracing: Tracing, selector: str
) -> None:
    gen = FakeChatModel(replies=ANSWERS)
    result = mode.run(best_of_n(gen, n=3, selector=SELECTORS[selector]()), "Capital of France?")

    run, select = tracing.one("fusion_graph.run"), tracing.one("fusion_graph.select")
    decision = result.decision
    assert decision.scores and decision.selected_index is not None
    assert parent_id(select) == span_id(run)
    assert all(parent_id(c) == span_id(run) for c in tracing.candidates())
    a = attrs(select)
    assert a["openinference.span.kind"] == "EVALUATOR"
    assert a["fusion_graph.method"] == decision.method
    assert a["fusion_graph.decision.selected_index"] == decision.selected_index
    assert a["fusion_graph.decision.score"] == decision.score
    assert a["fusion_graph.decision.fused"] is False
    assert evaluations(select) == decision.scores
    names = {dict(e.attributes or {})["gen_ai.evaluation.name"] for e in select.events}
    assert names == {decision.method}
    assert attrs(run)["fusion_graph.decision.selected_index"] == decision.selected_index
    assert attrs(run)["fusion_graph.strategy"] == "best_of_n"
    if selector == "llm_judge":
        assert decision.selected_index == 1  # "Lyon" scored 9
        assert a["gen_ai.usage.output_tokens"] > 0


def test_fusor_fallback_is_recorded_on_the_fuse_span(mode: Mode, tracing: Tracing) -> None:
    gen = FakeChatModel(replies=["42", "41", "42"])
    fusor = FakeChatModel(replies=[TimeoutError("fusor too slow")], model_name="fusor")
    mode.invoke(fusion_of_n(gen, n=3, fusor=fusor), "q?")

    a = attrs(tracing.one("fusion_graph.fuse"))
    assert a["fusion_graph.decision.fallback"] is True
    assert a["fusion_graph.decision.fused"] is False
    assert a["fusion_graph.decision.method"] == "majority_vote"
    assert a["fusion_graph.decision.selected_index"] == 0
    assert "fusor too slow" in a["fusion_graph.decision.fallback_reason"]
    assert evaluations(tracing.one("fusion_graph.fuse")) == {0: 2 / 3, 1: 1 / 3, 2: 2 / 3}


def test_failed_candidates_are_error_spans(mode: Mode, tracing: Tracing) -> None:
    gen = FakeChatModel(replies=_fail_on({1}))
    mode.invoke(fusion_of_n(gen, n=3, fusor=FakeChatModel()), "q?")

    ok0, failed, ok2 = tracing.candidates()
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.status.description == "RuntimeError: boom 1"
    assert attrs(failed)["error.type"] == "RuntimeError"
    assert "gen_ai.usage.output_tokens" not in attrs(failed)
    for span in (ok0, ok2):
        assert span.status.status_code == StatusCode.UNSET
        assert "error.type" not in attrs(span)
    run = attrs(tracing.one("fusion_graph.run"))
    assert run["fusion_graph.candidates.succeeded"] == 2
    assert run["fusion_graph.candidates.failed"] == 1
    assert tracing.one("fusion_graph.run").status.status_code == StatusCode.UNSET


def test_failed_run_is_an_error_span(mode: Mode, tracing: Tracing) -> None:
    gen = FakeChatModel(replies=_fail_on({0, 1, 2}))
    with pytest.raises(NotEnoughCandidatesError):
        mode.invoke(fusion_of_n(gen, n=3, fusor=FakeChatModel()), "q?")

    run = tracing.one("fusion_graph.run")
    assert run.status.status_code == StatusCode.ERROR
    assert attrs(run)["error.type"] == "NotEnoughCandidatesError"
    assert attrs(run)["fusion_graph.candidates.failed"] == 3
    assert [e.name for e in run.events] == ["exception"]
    assert not tracing.spans("fusion_graph.fuse")
    assert all(c.status.status_code == StatusCode.ERROR for c in tracing.candidates())


def test_critique_spans(mode: Mode, tracing: Tracing) -> None:
    def critic_reply(call: FakeCall) -> str | Exception:
        assert call.index is not None
        if call.index == 2:
            return ConnectionError("critic down")
        return f"Fine. Score: {call.index + 5}/10"

    critic = FakeChatModel(replies=critic_reply, model_name="critic")
    mode.invoke(
        fusion_of_n(FakeChatModel(replies=ANSWERS), n=3, fusor=FakeChatModel(), critic=critic), "q?"
    )

    run = tracing.one("fusion_graph.run")
    candidates = tracing.candidates()
    critiques = sorted(
        tracing.spans("critique critic"), key=lambda s: attrs(s)["fusion_graph.candidate.index"]
    )
    assert len(critiques) == 3
    for i, span in enumerate(critiques):
        # Under its candidate's span or beside it, never under another candidate's.
        assert parent_id(span) in {span_id(run), span_id(candidates[i])}
        assert attrs(span)["openinference.span.kind"] == "LLM"
        assert attrs(span)["gen_ai.request.model"] == "critic"
    assert attrs(critiques[0])["fusion_graph.critique.score"] == 5
    assert attrs(critiques[1])["gen_ai.usage.output_tokens"] == 3
    assert critiques[2].status.status_code == StatusCode.ERROR
    assert attrs(critiques[2])["error.type"] == "ConnectionError"


# --- nesting -----------------------------------------------------------------------------


def test_run_nests_under_the_callers_span(mode: Mode, tracing: Tracing) -> None:
    tracer = tracing.provider.get_tracer("caller")
    fused = fusion_of_n(FakeChatModel(replies=ANSWERS, delay=0.01), n=4, fusor=FakeChatModel())
    with tracer.start_as_current_span("caller") as caller:
        mode.invoke(fused, "q?")

    run = tracing.one("fusion_graph.run")
    assert parent_id(run) == caller.get_span_context().span_id
    # Candidates ran in worker threads (sync) or asyncio tasks (async): still children.
    candidates = tracing.candidates()
    assert len(candidates) == 4
    assert all(parent_id(c) == span_id(run) for c in candidates)
    assert parent_id(tracing.one("fusion_graph.fuse")) == span_id(run)
    trace_ids = {s.context.trace_id for s in tracing.spans() if s.context}
    assert trace_ids == {caller.get_span_context().trace_id}


def test_model_traces_nest_under_the_candidate_span(mode: Mode, tracing: Tracing) -> None:
    """Whatever the model traces inside a candidate hangs below that candidate's span."""
    tracer = tracing.provider.get_tracer("model")

    class TracedFake(FakeChatModel):
        def _reply(self, call: FakeCall) -> AIMessage:
            with tracer.start_as_current_span(f"model call {call.index}"):
                return super()._reply(call)

    mode.invoke(fusion_of_n(TracedFake(replies=ANSWERS), n=3, fusor=FakeChatModel()), "q?")

    for i, candidate in enumerate(tracing.candidates()):
        assert parent_id(tracing.one(f"model call {i}")) == span_id(candidate)


@pytest.mark.parametrize("strategy", ["fusion", "best_of_n"])
def test_subgraph_phases(mode: Mode, tracing: Tracing, strategy: Strategy) -> None:
    options: dict[str, Any] = (
        {"fusor": FakeChatModel(replies=["fused"])}
        if strategy == "fusion"
        else {"selector": MajorityVote()}
    )
    graph = create_fusion_graph(
        FakeChatModel(replies=ANSWERS), n=3, strategy=strategy, **options
    ).compile()
    tracer = tracing.provider.get_tracer("caller")
    with tracer.start_as_current_span("caller") as caller:
        mode.invoke(graph, {"messages": [("user", "q?")]})

    generate, decide = tracing.one("fusion_graph.generate"), tracing.one("fusion_graph.decide")
    assert parent_id(generate) == parent_id(decide) == caller.get_span_context().span_id
    assert attrs(generate)["fusion_graph.phase"] == "generate"
    assert attrs(generate)["fusion_graph.candidates.succeeded"] == 3
    assert "fusion_graph.decision.fused" not in attrs(generate)
    assert all(parent_id(c) == span_id(generate) for c in tracing.candidates())
    decision_span = tracing.one(
        "fusion_graph.fuse" if strategy == "fusion" else "fusion_graph.select"
    )
    assert parent_id(decision_span) == span_id(decide)
    assert attrs(decide)["fusion_graph.phase"] == "decide"
    assert attrs(decide)["fusion_graph.decision.fused"] is (strategy == "fusion")
    assert not tracing.spans("fusion_graph.run")


def test_candidates_of_one_multi_sample_call_are_siblings(mode: Mode, tracing: Tracing) -> None:
    class MultiSample(FakeChatModel):
        """Makes several samples in one call, like the embedded llama.cpp model."""

        def sample_n(
            self, messages: Sequence[BaseMessage], *, seeds: Sequence[int | None], **kw: Any
        ) -> list[AIMessage | Exception]:
            return [AIMessage(content=f"sample {s}") for s in seeds]

        async def asample_n(
            self, messages: Sequence[BaseMessage], *, seeds: Sequence[int | None], **kw: Any
        ) -> list[AIMessage | Exception]:
            return self.sample_n(messages, seeds=seeds)

    result = mode.run(fusion_of_n(MultiSample(), n=3, fusor=FakeChatModel(), seed=1), "q?")

    assert [c.text for c in result.candidates] == ["sample 1", "sample 2", "sample 3"]

    run = tracing.one("fusion_graph.run")
    candidates = tracing.candidates()
    assert len(candidates) == 3
    assert all(parent_id(c) == span_id(run) for c in candidates)


# --- content capture ---------------------------------------------------------------------

SECRET = "SECRET"


def _secret_runs(mode: Mode) -> None:
    """A fusion run with a critic and a judged best-of-n run, every text marked SECRET."""
    gen = FakeChatModel(replies=[f"{SECRET}-candidate-{i}" for i in range(3)])
    critic = FakeChatModel(replies=[f"{SECRET}-critique Score: 7/10"], model_name="critic")
    fusor = FakeChatModel(replies=[f"{SECRET}-answer"], model_name="fusor")
    judge = FakeChatModel(replies=[f'{{"score": 8, "rationale": "{SECRET}-rationale"}}'])
    question = f"{SECRET}-question?"
    mode.invoke(fusion_of_n(gen, n=3, fusor=fusor, critic=critic), question)
    mode.invoke(best_of_n(gen, n=2, selector=LLMJudge(judge)), question)


def test_content_is_not_recorded_by_default(mode: Mode, tracing: Tracing) -> None:
    _secret_runs(mode)
    spans = tracing.spans()
    assert len(spans) == 12  # 2 runs, 3 + 2 candidates, 3 critiques, fuse, select
    assert SECRET not in every_recorded_text(spans)
    assert not any("input.value" in attrs(s) or "output.value" in attrs(s) for s in spans)


@pytest.mark.parametrize("how", ["parameter", "env:true", "env:1", "env:YES"])
def test_content_is_recorded_when_asked(
    mode: Mode, instrument: Callable[..., Tracing], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "parameter":
        tracing = instrument(capture_content=True)
    else:
        monkeypatch.setenv(CAPTURE_CONTENT_ENV, how.removeprefix("env:"))
        tracing = instrument()
    _secret_runs(mode)

    runs = sorted(tracing.spans("fusion_graph.run"), key=lambda s: attrs(s)["fusion_graph.n"])
    best_run, fusion_run = runs
    assert attrs(fusion_run)["input.value"] == f"{SECRET}-question?"
    assert attrs(fusion_run)["output.value"] == f"{SECRET}-answer"
    assert attrs(tracing.one("fusion_graph.fuse"))["output.value"] == f"{SECRET}-answer"
    texts = {attrs(c)["output.value"] for c in tracing.candidates()}
    assert texts == {f"{SECRET}-candidate-{i}" for i in range(3)}
    critique = tracing.spans("critique")[0]
    assert attrs(critique)["output.value"] == f"{SECRET}-critique Score: 7/10"
    select = attrs(tracing.one("fusion_graph.select"))
    assert select["fusion_graph.decision.rationale"] == f"{SECRET}-rationale"
    assert attrs(best_run)["output.value"] == f"{SECRET}-candidate-0"


@pytest.mark.parametrize("value", ["false", "0", ""])
def test_content_stays_off_for_other_values(
    instrument: Callable[..., Tracing], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, value)
    tracing = instrument()
    fusion_of_n(FakeChatModel(replies=["SECRET"]), n=2, fusor=FakeChatModel()).invoke("q?")
    assert len(tracing.spans()) == 4
    assert SECRET not in every_recorded_text(tracing.spans())


def test_parameter_overrides_the_environment(
    instrument: Callable[..., Tracing], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "true")
    tracing = instrument(capture_content=False)
    fusion_of_n(FakeChatModel(replies=["SECRET"]), n=2, fusor=FakeChatModel()).invoke("q?")
    assert SECRET not in every_recorded_text(tracing.spans())


# --- instrument / uninstrument -----------------------------------------------------------


def test_uninstrument_stops_spans(instrument: Callable[..., Tracing]) -> None:
    tracing = instrument()
    assert isinstance(current_hooks(), OTelHooks)
    fused = fusion_of_n(FakeChatModel(), n=2, fusor=FakeChatModel())
    fused.invoke("q?")
    assert len(tracing.spans()) == 4

    FusionGraphInstrumentor().uninstrument()
    tracing.exporter.clear()
    fused.invoke("q?")
    assert tracing.spans() == []
    assert type(current_hooks()) is RunHooks


def test_instrumentor_declares_its_dependency() -> None:
    assert FusionGraphInstrumentor().instrumentation_dependencies() == ("fusion-graph",)


# --- configure_otlp ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_configure_otlp_sends_spans_over_http(
    otlp_receiver: tuple[str, list[tuple[str, bytes]]],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    url, received = otlp_receiver
    if how == "environment":
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    provider = configure_otlp(url if how == "argument" else None, project="unit-test")
    try:
        fusion_of_n(FakeChatModel(replies=ANSWERS), n=3, fusor=FakeChatModel()).invoke("q?")
        assert provider.force_flush(5_000)
    finally:
        FusionGraphInstrumentor().uninstrument()
        provider.shutdown()

    assert received and {path for path, _ in received} == {"/v1/traces"}
    names: list[str] = []
    for _, body in received:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource["service.name"] == "fusion-graph"
            assert resource["openinference.project.name"] == "unit-test"
            names += [s.name for scope in resource_spans.scope_spans for s in scope.spans]
    assert sorted(names) == ["chat fake-chat"] * 3 + ["fusion_graph.fuse", "fusion_graph.run"]


def test_configure_otlp_replaces_an_earlier_instrumentation(
    instrument: Callable[..., Tracing], otlp_receiver: tuple[str, list[tuple[str, bytes]]]
) -> None:
    earlier = instrument()
    provider = configure_otlp(otlp_receiver[0] + "/", capture_content=True)
    try:
        hooks = current_hooks()
        assert isinstance(hooks, OTelHooks) and hooks.capture_content
        fusion_of_n(FakeChatModel(), n=1, fusor=FakeChatModel()).invoke("q?")
        assert earlier.spans() == []
    finally:
        FusionGraphInstrumentor().uninstrument()
        provider.shutdown()


def test_candidate_spans_carry_the_models_own_temperature(tracing: Tracing) -> None:
    # No temperature set on the run: the spans say what the model samples at.
    hot = FakeChatModel(replies=ANSWERS, model_name="hot", temperature=0.9)
    bound = FakeChatModel(replies=ANSWERS, model_name="bound").bind(temperature=0.3)
    fusion_of_n([hot, bound], n=2, fusor=FakeChatModel()).invoke("q?")
    assert attrs(tracing.candidates("hot")[0])["gen_ai.request.temperature"] == 0.9
    assert attrs(tracing.candidates("bound")[0])["gen_ai.request.temperature"] == 0.3


def test_an_unreachable_collector_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import socket

    from fusion_graph.integrations.opentelemetry import configure_otlp, trace_delivery

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = configure_otlp(f"http://127.0.0.1:{port}", timeout=1.0)
    try:
        with caplog.at_level(logging.WARNING):
            fusion_of_n(FakeChatModel(), n=2, fusor=FakeChatModel()).invoke("q?")
            provider.force_flush()
            fusion_of_n(FakeChatModel(), n=2, fusor=FakeChatModel()).invoke("q?")
            provider.force_flush()
    finally:
        provider.shutdown()
        FusionGraphInstrumentor().uninstrument()
    delivery = trace_delivery(provider)
    assert delivery is not None and delivery.failed >= 8 and delivery.sent == 0
    ours = [r for r in caplog.records if r.name == "fusion_graph"]
    assert len(ours) == 1 and "could not send traces" in ours[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry.exporter")]


def test_a_cut_short_run_says_so_on_its_spans(mode: Mode, tracing: Tracing) -> None:
    gen = FakeChatModel(replies=ANSWERS, delays=[0, 0, 30.0])
    mode.invoke(fusion_of_n(gen, n=3, fusor=FakeChatModel(), grace=0.01), "q?")

    run = attrs(tracing.one("fusion_graph.run"))
    assert run["fusion_graph.candidates.succeeded"] == 2
    assert run["fusion_graph.candidates.cancelled"] == 1
    assert run["fusion_graph.candidates.failed"] == 0
    assert run["fusion_graph.decision.stopped"] == "grace"
    assert run["fusion_graph.decision.samples_used"] == 3
    assert "grace window" in run["fusion_graph.decision.stop_reason"]
    *_, cut = tracing.candidates()
    assert attrs(cut)["error.type"] == "CancelledError"
