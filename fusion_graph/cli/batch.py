"""The ``fusion-graph synth`` and ``fusion-graph eval`` commands.

``synth`` makes synthetic data from a pool of teachers (one JSONL row per prompt: every
teacher's answer, the Best-of-N pick and the Fusion-of-N answer); ``eval`` compares single
sample, Best-of-N (each selector), majority vote and Fusion-of-N at several N. Both record
every candidate and every deciding call in a candidate store (SQLite), so a rerun replays
instead of calling the models again, and a killed ``synth`` resumes where it stopped.

Progress and summaries go to stderr; ``eval`` prints its result table on stdout. The work
itself is done by :mod:`fusion_graph.batch`; this module declares the options, and
:mod:`fusion_graph.cli.jobs` shows the progress and the summaries.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fusion_graph.batch.data import BUILTIN, Columns
from fusion_graph.batch.evaluate import STRATEGY_NAMES
from fusion_graph.batch.metrics import EXTRACTORS, get_extractor
from fusion_graph.batch.pool import FUSOR_TEMPERATURE
from fusion_graph.batch.ray import EvalJob, SynthJob, eval_on_ray, synth_on_ray
from fusion_graph.batch.report import EvalReport, plot_scores, write_results
from fusion_graph.batch.store import CandidateStore
from fusion_graph.batch.synth import SynthReport
from fusion_graph.cli.errors import err
from fusion_graph.cli.jobs import (
    EvalProgress,
    SynthProgress,
    eval_summary,
    eval_with_progress,
    job_defaults,
    parse_ns,
    parse_strategies,
    read_items,
    run_job,
    synth_summary,
    synth_with_progress,
    usage,
)
from fusion_graph.models import ModelSpec
from fusion_graph.nodes.select import EarlyStop
from fusion_graph.nodes.verdicts import JUDGE_MAX_TOKENS


class SelectorChoice(StrEnum):
    judge = "judge"
    pairwise = "pairwise"
    vote = "vote"


# Options both commands take.
EndpointConcurrency = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Calls in flight per remote endpoint (URL) unless its spec says concurrency=. "
        "Default: 64 for a loopback server, 16 for any other. The embedded model takes one "
        "call at a time.",
    ),
]
Seed = Annotated[int, typer.Option(min=0, help="Base seed: candidate i samples with seed + i.")]
Timeout = Annotated[
    float | None, typer.Option(min=0.001, help="Seconds per model call before it fails.")
]
Retries = Annotated[int, typer.Option(min=0, help="Retries of a failed call (with backoff).")]
Limit = Annotated[int | None, typer.Option(min=1, help="Only the first K prompts.")]
Shard = Annotated[
    str | None,
    typer.Option(
        help="I/K: only prompts whose id hashes to shard I of K (run K jobs, e.g. on K "
        "machines, each with its own output; or split a set, e.g. 0/2 to tune and 1/2 to "
        "report)."
    ),
]
Fusor = Annotated[
    str | None,
    typer.Option(
        help="Model spec of the fusor. Default: the first teacher's model at temperature "
        f"{FUSOR_TEMPERATURE}."
    ),
]
ApiKeyEnv = Annotated[
    str, typer.Option(help="Environment variable with the API key of remote endpoints.")
]
Debug = Annotated[bool, typer.Option(help="Show tracebacks on errors.")]
UseRay = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Run as a Ray Data pipeline (pip install 'fusion-graph[ray]'): on the cluster at "
        "--ray-address, else on a local Ray started on loopback for the job. Same inputs, "
        "outputs and rows; --concurrency is then per worker. See docs/ray.md.",
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        envvar="RAY_ADDRESS",
        help="With --ray: a running cluster (auto, ray://HOST:10001, HOST:6379).",
    ),
]
RayWorkers = Annotated[
    int | None,
    typer.Option(min=1, help="With --ray: worker actors. Default: one per CPU of the cluster."),
]


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
            help="A teacher's model spec (see MODEL SPECS); repeat for a pool (the paper "
            "uses 5); teacher i samples with seed --seed + i. Default: local.",
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
    fusor: Fusor = None,
    store: Annotated[
        Path | None,
        typer.Option(
            help="Candidate store (SQLite). Default: OUTPUT.store.sqlite. Share one store "
            "between runs to replay candidates instead of generating them again."
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Prompts in flight.")] = 4,
    endpoint_concurrency: EndpointConcurrency = None,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Teacher temperature unless a spec sets one.")
    ] = 0.3,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens per answer unless a spec sets max_tokens=.")
    ] = 256,
    seed: Seed = 0,
    timeout: Timeout = None,
    retries: Retries = 1,
    grace: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Straggler cut-off: once one teacher answered a prompt, wait at most this "
            "many seconds for the others, then cancel them (their answers are null, the "
            "reason is in failed_teachers; the row is still written).",
        ),
    ] = None,
    limit: Limit = None,
    shard: Shard = None,
    prompt_field: Annotated[str, typer.Option(help="Column holding the prompt.")] = "prompt",
    id_field: Annotated[str, typer.Option(help="Column holding the id.")] = "id",
    ray: UseRay = False,
    ray_address: RayAddress = None,
    ray_workers: RayWorkers = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    debug: Debug = False,
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
    store_path = store or output.with_name(output.name + ".store.sqlite")

    defaults = job_defaults(locals())

    def work(specs: list[ModelSpec]) -> tuple[SynthReport, int]:
        columns = Columns(prompt=prompt_field, id=id_field)
        items, duplicates = read_items(str(prompts), columns, limit, shard)
        job = SynthJob(
            teachers=specs, defaults=defaults, selector=selector.value, judge=judge, fusor=fusor
        )
        if ray:
            with SynthProgress("synth (ray)") as shown:
                report = synth_on_ray(
                    items,
                    job,
                    output=output,
                    store=store_path,
                    address=ray_address,
                    workers=ray_workers,
                    concurrency=concurrency,
                    on_event=shown.on_event,
                )
            return report, duplicates
        with CandidateStore(store_path) as db:
            report = asyncio.run(synth_with_progress(items, job.build(db), output, concurrency))
        return report, duplicates

    report, duplicates = run_job(
        work,
        teacher,
        api_key_env=api_key_env,
        debug=debug,
        interrupted="Rows written so far are kept: rerun to resume.",
    )
    synth_summary(report, duplicates, output, store_path)
    if report.failed:
        err.print(
            f"[red]{len(report.failed)} prompt(s) have no row[/] (every teacher failed); "
            "rerun the same command to retry them."
        )
        raise typer.Exit(1)


# --- eval ---------------------------------------------------------------------------------------


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
            help="The model spec (see MODEL SPECS) sampled N times; repeat for a pool "
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
    fusor: Fusor = None,
    win_rate: Annotated[
        bool, typer.Option("--win-rate/--no-win-rate", help="Judge pairwise win-rates.")
    ] = True,
    early_stop_threshold: Annotated[
        float,
        typer.Option(
            help="majority-vote-early stops once P(the leader is ahead) reaches this "
            "(above 0.5, below 1).",
        ),
    ] = 0.95,
    early_stop_round: Annotated[
        int, typer.Option(min=1, help="majority-vote-early: candidates per round.")
    ] = 2,
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
            "--out", help="Directory for eval.json, eval.csv, eval.md, answers.jsonl and eval.png."
        ),
    ] = Path("eval-results"),
    plot: Annotated[
        Path | None, typer.Option(help="Where to write the PNG plot. Default: OUT/eval.png.")
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="Candidate store (SQLite). Default: OUT/store.sqlite.")
    ] = None,
    limit: Limit = None,
    shard: Shard = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Items in flight.")] = 2,
    endpoint_concurrency: EndpointConcurrency = None,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Sampling temperature unless a spec sets one.")
    ] = 0.8,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per candidate.")] = 128,
    seed: Seed = 0,
    timeout: Timeout = None,
    retries: Retries = 1,
    title: Annotated[str | None, typer.Option(help="Title of the plot.")] = None,
    ray: UseRay = False,
    ray_address: RayAddress = None,
    ray_workers: RayWorkers = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    debug: Debug = False,
) -> None:
    """Evaluate single sample, BoN (each selector), majority vote (fixed and early-stopping)
    and FusioN at each N, with each one's samples and tokens per item.

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

    defaults = job_defaults(locals())

    def work(specs: list[ModelSpec]) -> tuple[EvalReport, dict[str, Path]]:
        ns, names = parse_ns(n), parse_strategies(strategies, baseline)
        extract = usage(get_extractor, extractor)
        rule = usage(lambda _: EarlyStop(early_stop_threshold, early_stop_round), "")
        items, _ = read_items(dataset, Columns(), limit, shard)
        store_path = store or out_dir / "store.sqlite"
        job = EvalJob(
            models=specs,
            defaults=defaults,
            ns=ns,
            strategies=names,
            baseline=baseline,
            judge=judge,
            winrate_judge=winrate_judge,
            fusor=fusor,
            win_rate=win_rate,
            extract=extract,
            early_stop=rule,
        )
        if ray:
            with EvalProgress("eval (ray)", len(items)) as shown:
                report = eval_on_ray(
                    items,
                    job,
                    store=store_path,
                    address=ray_address,
                    workers=ray_workers,
                    concurrency=concurrency,
                    on_item=shown.on_item,
                )
        else:
            with CandidateStore(store_path) as db:
                report = asyncio.run(eval_with_progress(items, job.build(db), concurrency))
        command = shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else None
        report.config.update(
            {
                "command": f"fusion-graph eval {command}" if command is not None else None,
                "dataset": dataset,
                "items": len(items),
                "shard": shard,
                "n": ns,
                "strategies": names,
                "baseline": baseline,
                "extractor": extractor,
                "win_rate": win_rate,
                "early_stop": {"threshold": rule.threshold, "round_size": rule.round_size},
                "store": str(store_path),
                "temperature": temperature,
                "max_tokens": max_tokens,
                "seed": seed,
            }
        )
        paths = write_results(report, out_dir)
        label = title or f"{dataset}: {len(items)} items, models {report.config['models']}"
        try:
            paths["plot"] = plot_scores(
                report.scores, plot or out_dir / "eval.png", baseline=baseline, title=label
            )
        except ImportError:
            err.print("[yellow]matplotlib is not installed: no plot[/] (pip install matplotlib)")
        return report, paths

    report, paths = run_job(
        work,
        model,
        api_key_env=api_key_env,
        debug=debug,
        interrupted="Everything generated is in the store: rerun to resume.",
    )
    eval_summary(report, paths, baseline)
