"""Running the batch jobs from the command line: model specs and prompt files read with
usage errors (exit code 2), failures as sentences and exit codes, progress bars and
summaries. The commands themselves are in :mod:`fusion_graph.cli.batch`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
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

from fusion_graph.batch.data import (
    BUILTIN,
    Columns,
    PromptItem,
    parse_shard,
    read_prompts,
    select_items,
)
from fusion_graph.batch.evaluate import STRATEGY_NAMES, Evaluator, run_eval
from fusion_graph.batch.models import Defaults, JobStats
from fusion_graph.batch.report import (
    TABLE_HEADER,
    EvalReport,
    ItemResult,
    summary_lines,
    table_rows,
)
from fusion_graph.batch.synth import Synthesizer, SynthReport, run_synth
from fusion_graph.cli.errors import CliError, err, fail
from fusion_graph.models import ModelSpec

T = TypeVar("T")

out = Console()
"""The eval result table goes to stdout."""


def usage(parse: Callable[[str], T], text: str) -> T:
    """``parse(text)``, with a ``ValueError`` as a usage error (exit code 2)."""
    try:
        return parse(text)
    except ValueError as exc:
        raise CliError(str(exc), code=2) from None


def run_job(
    work: Callable[[list[ModelSpec]], T],
    specs: Sequence[str] | None,
    *,
    api_key_env: str,
    debug: bool,
    interrupted: str,
) -> T:
    """``work`` on the parsed model specs, its failures as sentences and exit codes."""
    parsed: list[ModelSpec] = []
    try:
        parsed = [usage(ModelSpec.parse, text) for text in specs or ["local"]]
        return work(parsed)
    except KeyboardInterrupt:
        err.print(f"[yellow]Interrupted.[/] {interrupted}")
        raise typer.Exit(130) from None
    except Exception as exc:
        first = parsed[0] if parsed else None
        where = " or ".join(first.urls) if first and first.urls else "the embedded model"
        key_env = str(first.options.get("api_key_env", api_key_env)) if first else api_key_env
        fail(exc, where=where, api_key_env=key_env, debug=debug)
        raise typer.Exit(1) from exc  # not reached: fail() exits


def job_defaults(options: Mapping[str, Any]) -> Defaults:
    """The :class:`~fusion_graph.batch.models.Defaults` of a job from the command's options
    of the same names (``synth`` and ``eval`` share them: temperature, max_tokens, seed,
    api_key_env, timeout, retries, endpoint_concurrency)."""
    return Defaults(**{f.name: options[f.name] for f in fields(Defaults) if f.name in options})


def read_items(
    path: str, columns: Columns, limit: int | None, shard: str | None
) -> tuple[list[PromptItem], int]:
    """The prompts of ``path`` (after ``--shard`` and ``--limit``) and how many duplicate
    rows were skipped; a missing or malformed file is a usage error."""
    if path != BUILTIN and not Path(path).is_file():
        msg = f"The prompt file {path} does not exist."
        raise CliError(msg, code=2)
    prompts = usage(lambda p: read_prompts(p, columns=columns), path)
    if not prompts.items:
        msg = (
            f"The prompt file {path} holds no prompts: write one JSON object per line with a "
            f"{columns.prompt!r} field (or a CSV/TSV with a {columns.prompt!r} column)."
        )
        raise CliError(msg, code=2)
    part = usage(parse_shard, shard) if shard else None
    return select_items(prompts.items, limit=limit, shard=part), prompts.duplicates


def progress_bar() -> Progress:
    """A job's progress bar, on stderr."""
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


def detail(stats: JobStats, failed: int) -> str:
    """The progress bar's counters."""
    tokens = stats.input_tokens + stats.output_tokens
    return f"{failed} failed · {stats.requests} calls · {tokens:,} tok"


def summary(stats: JobStats, rows: Sequence[tuple[str, str]], title: str | None = None) -> Table:
    """A job's summary: ``rows``, then its counters."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    generated = f"{stats.generated} generated, {stats.replayed} replayed from the store"
    table.add_row("candidates", f"{generated}, {stats.failed} failed")
    calls = f"{stats.recorded_calls} made, {stats.replayed_calls} replayed from the store"
    table.add_row("decision calls", calls)
    table.add_row("model requests", str(stats.requests))
    table.add_row("tokens", f"{stats.input_tokens:,} in, {stats.output_tokens:,} out")
    table.add_row("time", f"{stats.seconds:.1f} s")
    return table


class SynthProgress:
    """The progress bar of a synth job (one process or Ray): rows done of total, rows/s,
    failures so far (per teacher), calls and tokens. Use it as a context manager and pass
    :meth:`on_event` to the job."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.progress = progress_bar()
        self.task: TaskID | None = None

    def __enter__(self) -> SynthProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def on_event(self, kind: str, item: PromptItem | None, report: SynthReport) -> None:
        if kind == "start":
            done, total = report.already_done, report.total
            line = detail(report.stats, 0)
            self.task = self.progress.add_task(self.label, total=total, completed=done, detail=line)
            return
        assert self.task is not None
        rate = report.written / max(report.stats.seconds, 1e-9)
        teachers = ", ".join(f"{k} {v}" for k, v in sorted(report.teacher_failures.items()))
        line = f"{detail(report.stats, len(report.failed))} · {rate:.1f} rows/s"
        if teachers:
            line += f" · failed answers: {teachers}"
        self.progress.update(self.task, advance=1, detail=line)


async def synth_with_progress(
    items: list[PromptItem], synthesizer: Synthesizer, output: Path, concurrency: int
) -> SynthReport:
    with SynthProgress("synth") as shown:
        return await run_synth(
            items,
            synthesizer=synthesizer,
            output=output,
            concurrency=concurrency,
            on_event=shown.on_event,
        )


def synth_summary(report: SynthReport, duplicates: int, output: Path, store: Path) -> None:
    dup = f" ({duplicates} duplicate rows in the file skipped)" if duplicates else ""
    failures = ", ".join(f"{k}: {v}" for k, v in sorted(report.teacher_failures.items()))
    table = summary(
        report.stats,
        [
            ("prompts", f"{report.total}{dup}"),
            ("rows written", str(report.written)),
            ("already done", f"{report.already_done} (kept, not redone)"),
            ("failed prompts", f"{len(report.failed)} (no row; a rerun retries them)"),
            ("teacher failures", failures or "none"),
        ],
        title="synth summary",
    )
    table.add_row("output", str(output))
    table.add_row("store", str(store))
    err.print(table)
    for prompt_id, reason in report.failed[:5]:
        err.print(f"  [red]failed[/] {escape(prompt_id)}: {escape(reason[:300])}")


def parse_ns(text: str) -> list[int]:
    """``--n``: the values of N, sorted."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        msg = f"--n takes a comma-separated list like 1,2,4, not {text!r}"
        raise CliError(msg, code=2) from None
    if not values or values[0] < 1 or values[-1] > 64:
        msg = f"--n values must be between 1 and 64, got {text!r}"
        raise CliError(msg, code=2)
    return values


def parse_strategies(text: str, baseline: str) -> list[str]:
    """``--strategies``, with the ``--baseline`` strategy first when it is not among them."""
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [n for n in names if n not in STRATEGY_NAMES]
    if not names or unknown:
        which = ", ".join(unknown) or "(none)"
        msg = f"unknown strategy {which}: choose from {', '.join(STRATEGY_NAMES)}"
        raise CliError(msg, code=2)
    if baseline not in STRATEGY_NAMES:
        msg = f"--baseline must be one of {', '.join(STRATEGY_NAMES)}"
        raise CliError(msg, code=2)
    return names if baseline in names else [baseline, *names]


class EvalProgress:
    """The progress bar of an eval job: items done of total, failures, and (when the job's
    counters are in this process) calls and tokens. A context manager; pass
    :meth:`on_item` to the job."""

    def __init__(self, label: str, total: int, stats: JobStats | None = None) -> None:
        self.stats = stats
        self.failed = 0
        self.progress = progress_bar()
        self.task = self.progress.add_task(label, total=total, detail=self._detail())

    def _detail(self) -> str:
        if self.stats is None:
            return f"{self.failed} failed"
        return detail(self.stats, self.failed)

    def __enter__(self) -> EvalProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def on_item(self, item: PromptItem, result: ItemResult | None) -> None:
        self.failed += result is None
        self.progress.update(self.task, advance=1, detail=self._detail())


async def eval_with_progress(
    items: list[PromptItem], evaluator: Evaluator, concurrency: int
) -> EvalReport:
    stats = evaluator.pool.stats
    with EvalProgress("eval", len(items), stats) as shown:
        report = await run_eval(
            items, evaluator=evaluator, concurrency=concurrency, on_item=shown.on_item
        )
    report.config["seconds"] = round(stats.seconds, 1)
    return report


def eval_summary(report: EvalReport, paths: dict[str, Path], baseline: str) -> None:
    scores = Table(
        title=f"{report.config.get('items')} items · win-rate vs {baseline}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in TABLE_HEADER:
        scores.add_column(column, justify="left" if column == "strategy" else "right", no_wrap=True)
    for row in table_rows(report.scores):
        scores.add_row(*row)
    # Piped, rich assumes 80 columns and would cut cells: print the table at its own width.
    console = out
    if not out.is_terminal:
        natural = Measurement.get(out, out.options.update_width(10_000), scores).maximum
        console = Console(file=out.file, width=max(out.width, natural))
    console.print(scores)
    for line in summary_lines(report):
        console.print(line, markup=False, highlight=False)
    rows = [("items failed", str(len(report.failed)))]
    table = summary(report.stats, rows)
    for key, path in paths.items():
        table.add_row(key, str(path))
    err.print(table)
