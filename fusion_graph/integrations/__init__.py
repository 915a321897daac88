"""Optional integrations, each behind an extra: the embedded local model (``llama_cpp``,
``fusion-graph[local]``) and OpenTelemetry tracing (``opentelemetry``,
``fusion-graph[otel]``)."""
