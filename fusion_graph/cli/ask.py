"""``fusion-graph ask``: answer one question with Fusion-of-N or Best-of-N.

With no model options it runs the embedded local model (SmolLM2-135M-Instruct on
llama.cpp, CPU only, no network). ``--base-url`` / ``--model`` point it at any
OpenAI-compatible server (vLLM, llama.cpp server, hosted APIs). The answer goes to stdout;
progress and details go to stderr, so ``fusion-graph ask ... | other-tool`` works.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import typer
from langchain_core.language_models import BaseChatModel
from rich.console import Group
from rich.markup import escape
from rich.panel import Panel

from fusion_graph.cli.errors import CliError, err, explain
from fusion_graph.cli.progress import RunDisplay
from fusion_graph.cli.tracing import finish_tracing, start_tracing
from fusion_graph.integrations.llama_cpp_models import DEFAULT_MODEL, MODEL_ENV, PACKAGED_MODELS
from fusion_graph.models import ModelSpec, build_model
from fusion_graph.nodes.judges import make_selector
from fusion_graph.nodes.verdicts import JUDGE_MAX_TOKENS
from fusion_graph.types import Candidate, FusionResult, TokenUsage
from fusion_graph.wrap import FusionRunnable, StepOptions, best_of_n, fusion_of_n


class StrategyName(StrEnum):
    fusion = "fusion"
    best_of_n = "best-of-n"


class SelectorName(StrEnum):
    judge = "judge"
    pairwise = "pairwise"
    vote = "vote"


@dataclass(frozen=True, kw_only=True)
class ModelChoice:
    """Which model answers, judges and fuses: the embedded one, or a server's."""

    model: str | None
    base_url: str | None
    api_key_env: str
    temperature: float
    max_tokens: int
    timeout: float | None

    @property
    def where(self) -> str:
        return self.base_url or "the embedded local model"

    def spec(self) -> ModelSpec:
        if self.base_url is None and self.model is None:
            return ModelSpec(kind="local", text="local")
        if self.base_url is None:
            return self._local_spec(self.model or "")
        model = self.model or "default"
        return ModelSpec(
            kind="openai",
            urls=(self.base_url,),
            model=model,
            text=f"openai:{self.base_url}:{model}",
        )

    @staticmethod
    def _local_spec(model: str) -> ModelSpec:
        """``--model`` without ``--base-url``: a packaged local model, a GGUF file or a
        ``local:...`` spec."""
        text = model if model.startswith("local") else f"local:model={model}"
        if model.startswith("local") or model in PACKAGED_MODELS or model.endswith(".gguf"):
            try:
                return ModelSpec.parse(text)
            except ValueError as exc:
                raise CliError(str(exc), code=2) from exc
        msg = (
            f"--model {model} needs --base-url, the URL of an OpenAI-compatible server (e.g. "
            "http://127.0.0.1:8000/v1), unless it names an embedded model: "
            f"{', '.join(PACKAGED_MODELS)}, a .gguf file or local:OPTS."
        )
        raise CliError(msg, code=2)

    def build(self) -> BaseChatModel:
        spec = self.spec()
        try:
            return build_model(
                spec,
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                timeout=self.timeout,
                api_key_env=self.api_key_env,
            )
        except ValueError as exc:
            raise CliError(str(exc), code=2) from exc
        except (ImportError, FileNotFoundError) as exc:
            raise CliError(str(exc)) from exc


def _candidate_panel(candidate: Candidate) -> Panel:
    """A candidate (or its error) and its critiques, for --show-candidates."""
    body = escape(candidate.text) if candidate.ok else f"[red]{escape(str(candidate.error))}[/]"
    for critique in candidate.critiques:
        score = f" {critique.score:g}/10" if critique.score is not None else ""
        notes = critique.text if critique.error is None else f"failed: {critique.error}"
        who = escape(f"critique{score} ({critique.model}):")
        body += f"\n\n[dim]{who}[/] {escape(notes)}"
    title = f"candidate {candidate.index} · {escape(candidate.model)}"
    return Panel(body, title=title, title_align="left")


def _result_json(prompt: str, result: FusionResult, seconds: float) -> dict[str, Any]:
    candidates = []
    for c in result.candidates:
        data = c.model_dump(mode="json", exclude={"message"})
        data["status"] = c.status
        data["tool_calls"] = list(c.message.tool_calls) if c.message is not None else []
        candidates.append(data)
    usage = result.usage
    return {
        "prompt": prompt,
        "answer": str(result.message.text),
        "decision": result.decision.model_dump(mode="json"),
        "candidates": candidates,
        "usage": (usage or TokenUsage()).model_dump(),
        "timings": {"total_s": round(seconds, 3)},
    }


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
        str | None,
        typer.Option(
            help="With --base-url: the model's name on the server. Without: an embedded "
            f"model ({', '.join(PACKAGED_MODELS)}; default ${MODEL_ENV}, else "
            f"{DEFAULT_MODEL}), a chat GGUF file's path or a local:OPTS spec (e.g. "
            "local:model=smollm2-135m,repeat_penalty=1.2)."
        ),
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
    min_candidates: Annotated[
        int, typer.Option(min=1, help="Successful candidates needed to decide.")
    ] = 1,
    grace: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Straggler cut-off: once --min-candidates succeeded, wait at most this many "
            "seconds for the rest, then cancel them.",
        ),
    ] = None,
    early_stop: Annotated[
        bool,
        typer.Option(
            help="With --selector vote: sample in rounds of 2 and stop once the vote is "
            "settled (adaptive consistency).",
        ),
    ] = False,
    max_tokens_total: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Token budget of the run: no new model call starts once its calls used this "
            "many tokens.",
        ),
    ] = None,
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
    interrupted = False
    try:
        text = _read_prompt(prompt)
        if trace or trace_endpoint:
            provider = start_tracing(
                trace_endpoint, trace_project, what="--trace", service_name="fusion-graph"
            )
        if early_stop and not (
            strategy is StrategyName.best_of_n and selector is SelectorName.vote
        ):
            msg = (
                "--early-stop is a rule of the vote: use it with "
                "--strategy best-of-n --selector vote"
            )
            raise CliError(msg, code=2)
        if min_candidates > n:
            msg = f"--min-candidates {min_candidates} is more than --n {n}"
            raise CliError(msg, code=2)
        llm = choice.build()
        decider = llm.bind(temperature=0.2)
        options: StepOptions = {
            "critic": decider if critic else None,
            "seed": seed,
            "timeout": timeout,
            "min_candidates": min_candidates,
            "grace": grace,
            "max_total_tokens": max_tokens_total,
        }
        runnable: FusionRunnable
        if strategy is StrategyName.fusion:
            runnable = fusion_of_n(llm, n=n, fusor=decider, **options)
        else:
            judge = llm.bind(temperature=0.0, max_tokens=min(max_tokens, JUDGE_MAX_TOKENS))
            vote = make_selector(selector.value, judge, early_stop=early_stop)
            runnable = best_of_n(llm, n=n, selector=vote, **options)
        display = RunDisplay(n, err)
        started = time.perf_counter()
        with display:
            try:
                result = asyncio.run(
                    runnable.arun(text, on_event=display.on_event, on_token=display.on_token)
                )
            except KeyboardInterrupt:
                summary = display.interrupted()
                interrupted = True
        seconds = time.perf_counter() - started
        if interrupted:
            err.print(f"[yellow]Interrupted[/] after {seconds:.1f} s: {escape(summary)}.")
            raise typer.Exit(130)
    except typer.Exit:
        raise
    except Exception as exc:
        if debug:
            raise
        problem = explain(exc, where=choice.where, api_key_env=choice.api_key_env)
        err.print(f"[bold red]Error:[/] {escape(str(problem))}", soft_wrap=True)
        raise typer.Exit(problem.code) from None
    finally:
        if provider is not None:
            finish_tracing(provider, lost="The trace was not sent")

    decision = result.decision
    if decision.stopped is not None:
        made = f"{decision.samples_used} of {n} candidates made"
        why = escape(decision.stop_reason or "")
        err.print(f"[magenta]Cut short[/] ({decision.stopped}, {made}): {why}")
    if show_candidates:
        err.print(Group(*(_candidate_panel(c) for c in result.candidates)))
    if as_json:
        typer.echo(json.dumps(_result_json(text, result, seconds), indent=2, ensure_ascii=False))
    else:
        typer.echo(str(result.message.text))
