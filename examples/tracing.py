"""Tracing: send a Fusion-of-N run to Phoenix, LangSmith's OTLP endpoint or any OpenTelemetry
collector, and see the run, each candidate, and the decision as one trace.

    python -m phoenix.server.main serve &            # or any OTLP/HTTP collector
    python examples/tracing.py --endpoint http://127.0.0.1:6006
    python examples/tracing.py --content              # also record prompts and answers

Without --endpoint the standard OTEL_EXPORTER_OTLP_* variables are used.
"""

from __future__ import annotations

from _common import chat_model, parser

from fusion_graph import fusion_of_n
from fusion_graph.integrations.opentelemetry import configure_otlp, trace_delivery


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__ or "")
    p.add_argument("--endpoint", default=None, help="OTLP/HTTP base URL")
    p.add_argument("--project", default="fusion-graph-example", help="Phoenix project")
    p.add_argument("--content", action="store_true", help="record message content")
    args = p.parse_args(argv)

    provider = configure_otlp(args.endpoint, project=args.project, capture_content=args.content)
    llm = chat_model(args, max_tokens=64)
    tracer = provider.get_tracer("example")
    with tracer.start_as_current_span("my-app-request") as span:  # our spans nest below yours
        answer = fusion_of_n(llm, n=args.n, fusor=llm).invoke("What is a haiku?")
        trace_id = format(span.get_span_context().trace_id, "032x")
    provider.force_flush()
    provider.shutdown()
    delivery = trace_delivery(provider)
    if delivery is not None and delivery.failed:
        print(f"trace {trace_id} was NOT sent: {delivery.endpoint} is not accepting spans")
    else:
        print(f"trace {trace_id} sent to {args.endpoint or 'the OTEL_EXPORTER_OTLP endpoint'}")
    print(answer.text)


if __name__ == "__main__":
    main()
