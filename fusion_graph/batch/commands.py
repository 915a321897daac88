"""The ``fusion-graph synth`` and ``fusion-graph eval`` commands.

``synth`` makes synthetic data from a pool of teachers (one JSONL row per prompt: every
teacher's answer, the Best-of-N pick and the Fusion-of-N answer); ``eval`` compares single
sample, Best-of-N (each selector), majority vote and Fusion-of-N at several N. Both record
every candidate and every deciding call in a candidate store (SQLite), so a rerun replays
instead of calling the models again, and a killed ``synth`` resumes where it stopped.

Progress and summaries go to stderr; ``eval`` prints its result table on stdout.
Run them before they are registered in the main CLI with
``python -m fusion_graph.batch.commands synth|eval ...``.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fusion_graph.batch.data import BUILTIN, Columns, PromptItem, parse_shard, read_prompts
from fusion_graph.batch.evaluate import (
    EXTRACTORS,
    STRATEGY_NAMES,
    TABLE_HEADER,
    EvalReport,
    Evaluator,
    ItemResult,
    default_strategies,
    get_extractor,
    plot_scores,
    run_eval,
    table_rows,
    write_results,
)
from fusion_graph.batch.models import (
    Defaults,
    Endpoints,
    JobStats,
    ModelSpec,
    Pool,
    RecordedModel,
    build_handle,
    build_pool,
)
from fusion_graph.batch.store import CandidateStore
from fusion_graph.batch.synth import Synthesizer, SynthReport, run_synth
from fusion_graph.nodes.select import LLMJudge, MajorityVote, PairwiseJudge, Selector

if TYPE_CHECKING:
    from fusion_graph.cli import CliError, ModelChoice

batch_app = typer.Typer(
    help="Batch jobs: synthetic data from a teacher pool (synth) and BoN-vs-FusioN "
    "evaluation (eval).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

JUDGE_MAX_TOKENS = 48
"""Tokens a judge may answer with unless its spec says max_tokens= (a JSON verdict)."""


class SelectorChoice(StrEnum):
    judge = "judge"
    pairwise = "pairwise"
    vote = "vote"


def make_selector(name: str, judge: Any) -> Selector:
    """The BoN selector of ``synth``: judge, pairwise or vote."""
    if name == "vote":
        return MajorityVote()
    if judge is None:
        msg = f"the {name} selector needs a judge model"
        raise ValueError(msg)
    return LLMJudge(judge) if name == "judge" else PairwiseJudge(judge)


def _cli_error(message: str, code: int = 1) -> CliError:
    from fusion_graph.cli import CliError

    return CliError(message, code=code)


def _choice(spec: ModelSpec | None, api_key_env: str) -> ModelChoice:
    """A ModelChoice describing ``spec``, for the `ask` command's error sentences."""
    from fusion_graph.cli import ModelChoice

    return ModelChoice(
        model=spec.model if spec else None,
        base_url=" or ".join(spec.urls) if spec and spec.urls else None,
        api_key_env=str((spec.options if spec else {}).get("api_key_env", api_key_env)),
        temperature=0.0,
        max_tokens=1,
        timeout=None,
    )


def _fail(exc: BaseException, spec: ModelSpec | None, api_key_env: str, debug: bool) -> None:
    if debug:
        raise exc
    from fusion_graph.cli import _explain

    problem = _explain(exc, _choice(spec, api_key_env))
    err.print(f"[bold red]Error:[/] {escape(str(problem))}")
    raise typer.Exit(problem.code) from None


def _parse_specs(texts: Sequence[str] | None, default: str) -> list[ModelSpec]:
    try:
        return [ModelSpec.parse(t) for t in (texts or [default])]
    except ValueError as exc:
        raise _cli_error(str(exc), code=2) from None


def _decider_spec(
    text: str | None, first: ModelSpec, *, temperature: float, max_tokens: int | None
) -> ModelSpec:
    """The fusor / judge: its own spec (with these defaults), else the first teacher's
    model with this temperature (and max_tokens)."""
    if text is None:
        base = first.with_options(temperature=temperature, max_tokens=max_tokens)
        return ModelSpec(
            kind=base.kind,
            urls=base.urls,
            model=base.model,
            text=base.text,
            options={k: v for k, v in base.options.items() if k != "name"},
        )
    try:
        return ModelSpec.parse(text).with_defaults(temperature=temperature, max_tokens=max_tokens)
    except ValueError as exc:
        raise _cli_error(str(exc), code=2) from None


@dataclass(frozen=True)
class _Deciders:
    """Builds the recorded fusor / judge models of one job (their calls go through the store)."""

    first: ModelSpec
    defaults: Defaults
    endpoints: Endpoints
    db: CandidateStore
    stats: JobStats

    def model(
        self, text: str | None, *, role: str, temperature: float, max_tokens: int | None
    ) -> RecordedModel:
        spec = _decider_spec(text, self.first, temperature=temperature, max_tokens=max_tokens)
        handle = build_handle(spec, self.defaults, self.endpoints)
        return RecordedModel(handle, self.db, self.stats, role=role)


def _read(
    path: str, columns: Columns, limit: int | None, shard: str | None
) -> tuple[list[PromptItem], int]:
    from fusion_graph.batch.data import select_items

    if path != BUILTIN and not Path(path).is_file():
        msg = f"The prompt file {path} does not exist."
        raise _cli_error(msg, code=2)
    try:
        prompts = read_prompts(path, columns=columns)
        chosen = select_items(
            prompts.items, limit=limit, shard=parse_shard(shard) if shard else None
        )
    except ValueError as exc:
        raise _cli_error(str(exc), code=2) from None
    return chosen, prompts.duplicates


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def _detail(stats: JobStats, failed: int) -> str:
    tokens = stats.input_tokens + stats.output_tokens
    return f"{failed} failed · {stats.requests} calls · {tokens:,} tok"


def _counters(table: Table, stats: JobStats) -> None:
    table.add_row(
        "candidates",
        f"{stats.generated} generated, {stats.replayed} replayed from the store, "
        f"{stats.failed} failed",
    )
    table.add_row(
        "decision calls",
        f"{stats.recorded_calls} made, {stats.replayed_calls} replayed from the store",
    )
    table.add_row("model requests", str(stats.requests))
    table.add_row("tokens", f"{stats.input_tokens:,} in, {stats.output_tokens:,} out")
    table.add_row("time", f"{stats.seconds:.1f} s")


# --- synth --------------------------------------------------------------------------------------


def synth(
    prompts: Annotated[
        Path,
        typer.Argument(
            help="Prompt file: JSONL (one object per line) or CSV/TSV with a header. "
            "Column 'prompt' (see --prompt-field); optional 'id' (default: the prompt's "
            "SHA-256) and 'language_code'.",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="JSONL to write, one row per prompt. Rows already there are kept and not "
            "redone: rerun the same command to resume.",
        ),
    ],
    teacher: Annotated[
        list[str] | None,
        typer.Option(
            "--teacher",
            "-t",
            help="A teacher's model spec (see above); repeat for a pool (the paper uses "
            "5). Default: local (the embedded model).",
        ),
    ] = None,
    selector: Annotated[
        SelectorChoice,
        typer.Option(help="How BoN picks: LLM judge (1-10), pairwise tournament, or vote."),
    ] = SelectorChoice.judge,
    judge: Annotated[
        str | None,
        typer.Option(
            help="Model spec of the BoN judge. Default: the first teacher's model at "
            f"temperature 0, max_tokens {JUDGE_MAX_TOKENS}."
        ),
    ] = None,
    fusor: Annotated[
        str | None,
        typer.Option(
            help="Model spec of the fusor. Default: the first teacher's model at temperature 0.2."
        ),
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(
            help="Candidate store (SQLite). Default: OUTPUT.store.sqlite. Share one store "
            "between runs to replay candidates instead of generating them again."
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Prompts in flight.")] = 4,
    endpoint_concurrency: Annotated[
        int,
        typer.Option(
            min=1,
            help="Calls in flight per remote endpoint (URL) unless its spec says "
            "concurrency=. The embedded model takes one call at a time.",
        ),
    ] = 8,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Teacher temperature unless a spec sets one.")
    ] = 0.3,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens per answer unless a spec sets max_tokens=.")
    ] = 256,
    seed: Annotated[int, typer.Option(min=0, help="Base sampling seed.")] = 0,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, help="Seconds per model call before it fails.")
    ] = None,
    retries: Annotated[
        int, typer.Option(min=0, help="Retries of a failed call (with backoff).")
    ] = 1,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first K prompts.")] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/K: only prompts whose id hashes to shard I of K (run K jobs, e.g. on "
            "K machines, each with its own output; concatenate the outputs)."
        ),
    ] = None,
    prompt_field: Annotated[str, typer.Option(help="Column holding the prompt.")] = "prompt",
    id_field: Annotated[str, typer.Option(help="Column holding the id.")] = "id",
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable with the API key of remote endpoints.")
    ] = "OPENAI_API_KEY",
    debug: Annotated[bool, typer.Option(help="Show tracebacks on errors.")] = False,
) -> None:
    """Synthetic data from a teacher pool: every answer, the BoN pick, the FusioN answer.

    Every teacher answers each prompt once; a selector picks the Best-of-N answer and a
    fusor writes the Fusion-of-N answer. One JSONL row per prompt, appended as prompts
    finish: rerun the same command to resume. Candidates and decisions are recorded in
    the store (--store), so a rerun or another job replays them without model calls.

    MODEL SPECS: local[:OPTS] (the embedded model) | openai:URL:MODEL[:OPTS] (any
    OpenAI-compatible server) | vllm:URL:MODEL[:OPTS] (a vLLM server; a prompt's samples
    in one request). URL may join replicas of one model with '+'. OPTS: key=value,...
    from temperature, top_p, max_tokens, seed, name, concurrency (calls in flight per
    endpoint), timeout, api_key_env, path (local GGUF file).

    Example: synth prompts.jsonl -o data.jsonl -t local:temperature=0.3 -t
    openai:http://127.0.0.1:8000/v1:Qwen/Qwen2.5-7B-Instruct:name=qwen
    """
    first: ModelSpec | None = None
    try:
        specs = _parse_specs(teacher, "local")
        first = specs[0]
        items, duplicates = _read(
            str(prompts), Columns(prompt=prompt_field, id=id_field), limit, shard
        )
        defaults = Defaults(
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
            api_key_env=api_key_env,
            timeout=timeout,
            retries=retries,
            endpoint_concurrency=endpoint_concurrency,
        )
        store_path = store or output.with_name(output.name + ".store.sqlite")
        report = asyncio.run(
            _synth(
                items,
                specs,
                defaults,
                store_path=store_path,
                output=output,
                selector=selector,
                judge=judge,
                fusor=fusor,
                concurrency=concurrency,
            )
        )
    except KeyboardInterrupt:
        err.print("[yellow]Interrupted.[/] Rows written so far are kept: rerun to resume.")
        raise typer.Exit(130) from None
    except Exception as exc:
        _fail(exc, first, api_key_env, debug)
        return
    _synth_summary(report, duplicates, output, store_path)
    if report.failed:
        err.print(
            f"[red]{len(report.failed)} prompt(s) have no row[/] (every teacher failed); "
            "rerun the same command to retry them."
        )
        raise typer.Exit(1)


async def _synth(
    items: list[PromptItem],
    specs: list[ModelSpec],
    defaults: Defaults,
    *,
    store_path: Path,
    output: Path,
    selector: SelectorChoice,
    judge: str | None,
    fusor: str | None,
    concurrency: int,
) -> SynthReport:
    endpoints = Endpoints()
    stats = JobStats()
    with CandidateStore(store_path) as db:
        handles = build_pool(specs, defaults, endpoints)
        deciders = _Deciders(specs[0], defaults, endpoints, db, stats)
        fusor_model = deciders.model(fusor, role="fusor", temperature=0.2, max_tokens=None)
        judge_model = None
        if selector is not SelectorChoice.vote:
            judge_model = deciders.model(
                judge, role="judge", temperature=0.0, max_tokens=JUDGE_MAX_TOKENS
            )
        synthesizer = Synthesizer(
            Pool(handles, db, stats),
            selector=make_selector(selector.value, judge_model),
            fusor=fusor_model,
        )
        progress = _progress()
        task: TaskID | None = None

        def on_event(kind: str, item: PromptItem | None, report: SynthReport) -> None:
            nonlocal task
            if kind == "start":
                task = progress.add_task(
                    "synth",
                    total=report.total,
                    completed=report.already_done,
                    detail=_detail(stats, 0),
                )
                return
            assert task is not None
            progress.update(task, advance=1, detail=_detail(stats, len(report.failed)))

        with progress:
            return await run_synth(
                items,
                synthesizer=synthesizer,
                output=output,
                concurrency=concurrency,
                on_event=on_event,
                report=SynthReport(stats=stats),
            )


def _synth_summary(report: SynthReport, duplicates: int, output: Path, store: Path) -> None:
    table = Table(title="synth summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    dup = f" ({duplicates} duplicate rows in the file skipped)" if duplicates else ""
    table.add_row("prompts", f"{report.total}{dup}")
    table.add_row("rows written", str(report.written))
    table.add_row("already done", f"{report.already_done} (kept, not redone)")
    table.add_row("failed prompts", f"{len(report.failed)} (no row; a rerun retries them)")
    failures = ", ".join(f"{k}: {v}" for k, v in sorted(report.teacher_failures.items()))
    table.add_row("teacher failures", failures or "none")
    _counters(table, report.stats)
    table.add_row("output", str(output))
    table.add_row("store", str(store))
    err.print(table)
    for prompt_id, reason in report.failed[:5]:
        err.print(f"  [red]failed[/] {escape(prompt_id)}: {escape(reason[:300])}")


# --- eval ---------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        msg = f"--n takes a comma-separated list like 1,2,4, not {text!r}"
        raise _cli_error(msg, 2) from None
    if not values or values[0] < 1 or values[-1] > 64:
        msg = f"--n values must be between 1 and 64, got {text!r}"
        raise _cli_error(msg, code=2)
    return values


def _names(text: str) -> list[str]:
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [n for n in names if n not in STRATEGY_NAMES]
    if not names or unknown:
        msg = (
            f"unknown strategy {', '.join(unknown) or '(none)'}: choose from "
            f"{', '.join(STRATEGY_NAMES)}"
        )
        raise _cli_error(
            msg,
            code=2,
        )
    return names


def eval_command(
    dataset: Annotated[
        str,
        typer.Argument(
            help="JSONL or CSV of prompts (column 'prompt'; optional 'reference' (a string "
            "or a list of acceptable answers; in CSV separated by '|') and 'id'), or "
            f"'{BUILTIN}' for the built-in set of short questions with references.",
        ),
    ] = BUILTIN,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="The model spec (see above) sampled N times; repeat for a pool "
            "(candidate i from model i mod count). Default: local.",
        ),
    ] = None,
    n: Annotated[
        str, typer.Option("--n", "-n", help="Values of N, comma separated (max 64).")
    ] = "1,2,4",
    strategies: Annotated[
        str, typer.Option(help=f"Comma-separated, from {', '.join(STRATEGY_NAMES)}.")
    ] = ",".join(STRATEGY_NAMES),
    baseline: Annotated[
        str,
        typer.Option(
            help="Win-rates are against this strategy: 'single' (one sample), or another "
            "strategy, compared at the same N."
        ),
    ] = "single",
    judge: Annotated[
        str | None,
        typer.Option(
            help="Model spec of the BoN judges. Default: the first model at temperature 0, "
            f"max_tokens {JUDGE_MAX_TOKENS}."
        ),
    ] = None,
    winrate_judge: Annotated[
        str | None,
        typer.Option(help="Model spec of the win-rate judge. Default: the --judge model."),
    ] = None,
    fusor: Annotated[
        str | None,
        typer.Option(help="Model spec of the fusor. Default: the first model at temperature 0.2."),
    ] = None,
    win_rate: Annotated[
        bool, typer.Option("--win-rate/--no-win-rate", help="Judge pairwise win-rates.")
    ] = True,
    extractor: Annotated[
        str,
        typer.Option(
            help=f"How the scored answer is taken from a reply: {', '.join(EXTRACTORS)}, or "
            "package.module:function."
        ),
    ] = "final",
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Directory for eval.json, eval.csv, eval.md, answers.jsonl and eval.png.",
        ),
    ] = Path("eval-results"),
    plot: Annotated[
        Path | None, typer.Option(help="Where to write the PNG plot. Default: OUT/eval.png.")
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(help="Candidate store (SQLite). Default: OUT/store.sqlite."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first K items.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Items in flight.")] = 2,
    endpoint_concurrency: Annotated[
        int, typer.Option(min=1, help="Calls in flight per remote endpoint.")
    ] = 8,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Sampling temperature unless a spec sets one.")
    ] = 0.8,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per candidate.")] = 128,
    seed: Annotated[int, typer.Option(min=0, help="Base seed (candidate i: seed + i).")] = 0,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, help="Seconds per model call before it fails.")
    ] = None,
    retries: Annotated[int, typer.Option(min=0, help="Retries of a failed call.")] = 1,
    title: Annotated[str | None, typer.Option(help="Title of the plot.")] = None,
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable with the API key of remote endpoints.")
    ] = "OPENAI_API_KEY",
    debug: Annotated[bool, typer.Option(help="Show tracebacks on errors.")] = False,
) -> None:
    """Evaluate single sample, BoN (each selector), majority vote and FusioN at each N.

    Every strategy at every N uses the first N of the same stored candidates. Metrics:
    exact-match and contains-answer accuracy against references, and win-rates against
    a baseline judged pairwise by an LLM in both orders. Writes eval.json, eval.csv,
    eval.md, answers.jsonl and a PNG plot of quality against N.

    MODEL SPECS: local[:OPTS] (the embedded model) | openai:URL:MODEL[:OPTS] (any
    OpenAI-compatible server) | vllm:URL:MODEL[:OPTS] (a vLLM server; a prompt's samples
    in one request). URL may join replicas of one model with '+'. OPTS: key=value,...
    from temperature, top_p, max_tokens, seed, name, concurrency (calls in flight per
    endpoint), timeout, api_key_env, path (local GGUF file).

    Example: eval --limit 40 --n 1,2,4 --max-tokens 48 --out eval-results
    """
    first: ModelSpec | None = None
    try:
        specs = _parse_specs(model, "local")
        first = specs[0]
        ns = _int_list(n)
        names = _names(strategies)
        if baseline not in STRATEGY_NAMES:
            msg = f"--baseline must be one of {', '.join(STRATEGY_NAMES)}"
            raise _cli_error(msg, code=2)
        if baseline not in names:
            names.insert(0, baseline)
        try:
            extract = get_extractor(extractor)
        except ValueError as exc:
            raise _cli_error(str(exc), code=2) from None
        items, _ = _read(dataset, Columns(), limit, None)
        defaults = Defaults(
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
            api_key_env=api_key_env,
            timeout=timeout,
            retries=retries,
            endpoint_concurrency=endpoint_concurrency,
        )
        store_path = store or out_dir / "store.sqlite"
        report = asyncio.run(
            _eval(
                items,
                specs,
                defaults,
                store_path=store_path,
                ns=ns,
                names=names,
                baseline=baseline,
                judge=judge,
                winrate_judge=winrate_judge,
                fusor=fusor,
                win_rate=win_rate,
                extract=extract,
                concurrency=concurrency,
            )
        )
        report.config.update(
            {
                "command": "fusion-graph eval " + shlex.join(sys.argv[2:])
                if len(sys.argv) > 1 and sys.argv[1] == "eval"
                else None,
                "dataset": dataset,
                "items": len(items),
                "n": ns,
                "strategies": names,
                "baseline": baseline,
                "extractor": extractor,
                "win_rate": win_rate,
                "store": str(store_path),
                "temperature": temperature,
                "max_tokens": max_tokens,
                "seed": seed,
            }
        )
        paths = write_results(report, out_dir)
        plot_path = plot or out_dir / "eval.png"
        try:
            paths["plot"] = plot_scores(
                report.scores,
                plot_path,
                baseline=baseline,
                title=title or f"{dataset}: {len(items)} items, models {report.config['models']}",
            )
        except ImportError:
            err.print("[yellow]matplotlib is not installed: no plot[/] (pip install matplotlib)")
    except KeyboardInterrupt:
        err.print("[yellow]Interrupted.[/] Everything generated is in the store: rerun to resume.")
        raise typer.Exit(130) from None
    except Exception as exc:
        _fail(exc, first, api_key_env, debug)
        return
    _eval_summary(report, paths, baseline)


async def _eval(
    items: list[PromptItem],
    specs: list[ModelSpec],
    defaults: Defaults,
    *,
    store_path: Path,
    ns: list[int],
    names: list[str],
    baseline: str,
    judge: str | None,
    winrate_judge: str | None,
    fusor: str | None,
    win_rate: bool,
    extract: Any,
    concurrency: int,
) -> EvalReport:
    endpoints = Endpoints()
    stats = JobStats()
    with CandidateStore(store_path) as db:
        handles = build_pool(specs, defaults, endpoints)
        deciders = _Deciders(specs[0], defaults, endpoints, db, stats)
        judge_model = deciders.model(
            judge, role="judge", temperature=0.0, max_tokens=JUDGE_MAX_TOKENS
        )
        rate_model = judge_model
        if winrate_judge is not None:
            rate_model = deciders.model(
                winrate_judge, role="winrate-judge", temperature=0.0, max_tokens=JUDGE_MAX_TOKENS
            )
        fusor_model = deciders.model(fusor, role="fusor", temperature=0.2, max_tokens=None)
        evaluator = Evaluator(
            pool=Pool(handles, db, stats),
            strategies=default_strategies(
                names, judge=judge_model, fusor=fusor_model, extract=extract
            ),
            ns=ns,
            baseline=baseline,
            judge=rate_model if win_rate else None,
            extract=extract,
        )
        progress = _progress()
        failed = 0
        with progress:
            task = progress.add_task("eval", total=len(items), detail=_detail(stats, 0))

            def on_item(item: PromptItem, result: ItemResult | None) -> None:
                nonlocal failed
                failed += result is None
                progress.update(task, advance=1, detail=_detail(stats, failed))

            report = await run_eval(
                items, evaluator=evaluator, concurrency=concurrency, on_item=on_item
            )
        report.config["models"] = [h.name for h in handles]
        report.config["model_settings"] = {h.name: h.settings for h in handles}
        report.config["judge"] = judge_model.handle.model_id
        report.config["judge_settings"] = judge_model.handle.settings
        report.config["winrate_judge"] = rate_model.handle.model_id if win_rate else None
        report.config["fusor"] = fusor_model.handle.model_id
        report.config["fusor_settings"] = fusor_model.handle.settings
        report.config["seconds"] = round(stats.seconds, 1)
        return report


def _eval_summary(report: EvalReport, paths: dict[str, Path], baseline: str) -> None:
    table = Table(
        title=f"{report.config.get('items')} items · win-rate vs {baseline}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in TABLE_HEADER:
        if column == "strategy":
            table.add_column(column, justify="left", no_wrap=True)
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for row in table_rows(report.scores):
        table.add_row(*row)
    out.print(table)
    summary = Table(show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("items failed", str(len(report.failed)))
    _counters(summary, report.stats)
    for key, path in paths.items():
        summary.add_row(key, str(path))
    err.print(summary)


batch_app.command("synth")(synth)
batch_app.command("eval")(eval_command)

if __name__ == "__main__":
    batch_app()
