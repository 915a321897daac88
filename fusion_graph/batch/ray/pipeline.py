"""The Ray Data pipelines of ``synth`` and ``eval`` (:func:`synthesize`, :func:`evaluate`),
and their drivers (:func:`synth_on_ray`, :func:`eval_on_ray`): the rows come back to the
driver as batches finish, which appends them to the output (each id once) or makes the
evaluation's table from them with the single-machine :func:`~fusion_graph.batch.run_eval`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion_graph.batch.data import PromptItem
from fusion_graph.batch.evaluate import Evaluator, ItemEvent, run_eval
from fusion_graph.batch.models import JobStats
from fusion_graph.batch.ray.cluster import ClusterStore, ray_session, start_gate, start_store
from fusion_graph.batch.ray.jobs import (
    EvalJob,
    EvalStage,
    Stage,
    SynthJob,
    SynthStage,
    add_counters,
    item_json,
)
from fusion_graph.batch.report import EvalReport, ItemResult
from fusion_graph.batch.store import StoreConflictError
from fusion_graph.batch.synth import SynthEvent, SynthReport, prepare_output

if TYPE_CHECKING:
    from ray.data import Dataset


@dataclass(frozen=True, kw_only=True)
class Shared:
    """The actors a job's workers share: the store's and the gate."""

    store: Any
    store_path: Path
    gate: Any

    @classmethod
    def start(cls, store_path: Path) -> Shared:
        path = Path(store_path).resolve()
        return cls(store=start_store(path), store_path=path, gate=start_gate())


def _pipeline(
    dataset: Dataset,
    job: SynthJob | EvalJob,
    stage: type[Stage],
    *,
    shared: Shared,
    workers: int | None,
    concurrency: int,
    num_cpus: float,
) -> Dataset:
    import ray

    if workers is None:
        cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
        workers = max(1, int(cpus // num_cpus)) if num_cpus > 0 else 1
    # The workers read the endpoints' API keys from their environment: the driver's go along.
    keys = {name: os.environ[name] for name in sorted(job.api_key_envs()) if name in os.environ}
    remote_args: dict[str, Any] = {"runtime_env": {"env_vars": keys}} if keys else {}
    return dataset.map_batches(item_json, batch_format="pyarrow").map_batches(
        stage,
        batch_format="pyarrow",
        batch_size=max(1, concurrency),
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=num_cpus,
        fn_constructor_kwargs={
            "job": job,
            "store": shared.store,
            "store_path": str(shared.store_path),
            "gate": shared.gate,
            "concurrency": concurrency,
        },
        **remote_args,
    )


def synthesize(
    dataset: Dataset,
    job: SynthJob,
    *,
    store: Path | str | None = None,
    shared: Shared | None = None,
    workers: int | None = None,
    concurrency: int = 4,
    num_cpus: float = 1.0,
) -> Dataset:
    """The synth rows of ``dataset`` as a (lazy) Ray Dataset: one row per prompt, with
    columns ``id``, ``row`` (the JSON line ``fusion-graph synth`` writes, or null),
    ``error`` (why a prompt has no row: every teacher failed), ``conflict``,
    ``teacher_failures`` and ``stats`` (JSON). ``dataset`` has a ``prompt`` column (and
    optionally ``id``, ``language_code``), as a prompt file. ``store``: the candidate store
    (SQLite, on the driver's node); ``workers``: actors (default: the cluster's CPUs over
    ``num_cpus``); ``concurrency``: prompts in flight per worker. Call it inside
    ``ray.init()``; for a resumable output file, use :func:`synth_on_ray`.

    Example:
        >>> ds = ray.data.read_json("prompts.jsonl")  # doctest: +SKIP
        >>> rows = synthesize(ds, SynthJob(teachers=[ModelSpec.parse("local")],
        ...     defaults=Defaults(temperature=0.3, max_tokens=256)), store="store.sqlite")
        >>> rows.filter(lambda r: r["row"] is not None).write_json("out/")  # doctest: +SKIP
    """
    if shared is None:
        if store is None:
            msg = "synthesize() needs a candidate store: store= (a path) or shared="
            raise ValueError(msg)
        shared = Shared.start(Path(store))
    return _pipeline(
        dataset,
        job,
        SynthStage,
        shared=shared,
        workers=workers,
        concurrency=concurrency,
        num_cpus=num_cpus,
    )


def evaluate(
    dataset: Dataset,
    job: EvalJob,
    *,
    store: Path | str | None = None,
    shared: Shared | None = None,
    workers: int | None = None,
    concurrency: int = 2,
    num_cpus: float = 1.0,
) -> Dataset:
    """The per-item results of an evaluation as a (lazy) Ray Dataset: columns ``id``,
    ``row`` (JSON ``{"result": <a line of answers.jsonl>, "votes": ...}``), ``error``,
    ``conflict``, ``stats``. The table is made from them by :func:`eval_on_ray`. Options as
    :func:`synthesize`."""
    if shared is None:
        if store is None:
            msg = "evaluate() needs a candidate store: store= (a path) or shared="
            raise ValueError(msg)
        shared = Shared.start(Path(store))
    return _pipeline(
        dataset,
        job,
        EvalStage,
        shared=shared,
        workers=workers,
        concurrency=concurrency,
        num_cpus=num_cpus,
    )


# --- the drivers ------------------------------------------------------------------------------


@dataclass
class _Collected:
    """What has come back from the workers so far."""

    stats: JobStats
    seen: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)
    teacher_failures: Counter[str] = field(default_factory=Counter)


def _results(dataset: Dataset, collected: _Collected) -> Iterator[list[dict[str, Any]]]:
    """The workers' rows, batch by batch as they finish, each id once (a task retried after
    a worker died may send its rows again), the counters added to ``collected.stats``.

    Raises:
        StoreConflictError: a prompt id is stored for another prompt text.
    """
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        fresh = []
        table: Any = batch
        for row in table.to_pylist():
            if row["stats"]:
                add_counters(collected.stats, json.loads(row["stats"]))
            if row["conflict"]:
                raise StoreConflictError(row["error"])
            if row["id"] in collected.seen:
                continue
            if row["id"] not in collected.errors:  # a prompt failed and retried counts once
                collected.teacher_failures.update(json.loads(row["teacher_failures"]))
            if row["row"] is None:
                collected.errors[row["id"]] = row["error"] or "unknown"
                continue
            collected.seen.add(row["id"])
            collected.errors.pop(row["id"], None)
            fresh.append(row)
        yield fresh


def _append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append whole lines, flushed and fsynced (a kill mid-write leaves at most a partial
    last line, which :func:`prepare_output` cuts)."""
    if not lines:
        return
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())


def _items_dataset(items: Sequence[PromptItem]) -> Dataset:
    import ray

    return ray.data.from_items([{"item": it.model_dump_json()} for it in items])


def _quiet_data(progress_bars: bool) -> None:
    from ray.data import DataContext

    if not progress_bars:  # the caller shows progress: Ray Data's own notes are noise then
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = DataContext.get_current()
    context.enable_progress_bars = progress_bars
    context.execution_options.preserve_order = False  # rows as they finish


def synth_on_ray(
    items: Sequence[PromptItem],
    job: SynthJob,
    *,
    output: Path,
    store: Path,
    address: str | None = None,
    workers: int | None = None,
    concurrency: int = 4,
    num_cpus: float = 1.0,
    on_event: SynthEvent | None = None,
    progress_bars: bool = False,
) -> SynthReport:
    """``fusion-graph synth --ray``: :func:`synthesize` over ``items``, the rows appended to
    ``output`` as batches finish. Resumable as the single-machine job: the rows already in
    ``output`` are kept and their prompts not sent; each id is written once.
    ``address``: a running cluster (``auto``, ``ray://host:10001``); None starts a local
    Ray on loopback for the job. ``on_event``: as :func:`~fusion_graph.batch.run_synth`'s.

    Raises:
        OutputMismatchError / ValueError: the output holds other rows.
        StoreConflictError: a prompt id is stored for another prompt text.
        ValueError / ImportError: a model cannot be built.
    """
    # The driver builds the job once before any worker does: a bad spec fails here.
    probe = job.build(ClusterStore(None, store))
    teachers = [h.name for h in probe.pool.handles]
    report = SynthReport(stats=JobStats())
    done = prepare_output(output, teachers)
    report.total = len(items)
    todo = [it for it in items if it.id not in done]
    report.already_done = len(items) - len(todo)
    by_id = {it.id: it for it in todo}
    if on_event:
        on_event("start", None, report)
    if not todo:
        return report
    collected = _Collected(stats=report.stats, teacher_failures=report.teacher_failures)
    with ray_session(address):
        _quiet_data(progress_bars)
        shared = Shared.start(store)
        rows = synthesize(
            _items_dataset(todo),
            job,
            shared=shared,
            workers=workers,
            concurrency=concurrency,
            num_cpus=num_cpus,
        )
        for fresh in _results(rows, collected):
            _append_lines(output, [r["row"] for r in fresh])
            for r in fresh:
                report.written += 1
                if on_event:
                    on_event("row", by_id.get(r["id"]), report)
            for prompt_id in sorted(set(collected.errors) - {i for i, _ in report.failed}):
                report.failed.append((prompt_id, collected.errors[prompt_id]))
                if on_event:
                    on_event("failed", by_id.get(prompt_id), report)
    report.failed = sorted(collected.errors.items())
    return report


class _Replayed(Evaluator):
    """An :class:`Evaluator` whose items were evaluated by the workers: :func:`run_eval`
    makes the table from them exactly as it does for a single-machine run."""

    results: Mapping[str, ItemResult | tuple[str, str]]

    @classmethod
    def of_results(
        cls, evaluator: Evaluator, results: Mapping[str, ItemResult | tuple[str, str]]
    ) -> _Replayed:
        values = {f.name: getattr(evaluator, f.name) for f in fields(Evaluator) if f.init}
        replayed = cls(**values)
        object.__setattr__(replayed, "results", results)
        return replayed

    async def item(self, item: PromptItem) -> ItemResult:
        result = self.results[item.id]
        if isinstance(result, tuple):  # the worker's failure, with its own type name
            kind, message = result
            raise type(kind, (Exception,), {})(message)
        return result


def eval_on_ray(
    items: Sequence[PromptItem],
    job: EvalJob,
    *,
    store: Path,
    address: str | None = None,
    workers: int | None = None,
    concurrency: int = 2,
    num_cpus: float = 1.0,
    on_item: ItemEvent | None = None,
    progress_bars: bool = False,
) -> EvalReport:
    """``fusion-graph eval --ray``: every item evaluated by :func:`evaluate` on the cluster,
    then the table made on the driver by :func:`~fusion_graph.batch.run_eval` (the same
    report as the single-machine job; write it with
    :func:`~fusion_graph.batch.write_results`). Every candidate and decision goes through
    ``store``, so a rerun (on Ray or not) replays them. Options as :func:`synth_on_ray`.

    Raises:
        StoreConflictError: a prompt id is stored for another prompt text.
        ValueError / ImportError: a model or a strategy cannot be built.
    """
    stats = JobStats()
    evaluator = job.build(ClusterStore(None, store), stats)
    by_id = {it.id: it for it in items}
    results: dict[str, ItemResult | tuple[str, str]] = {}
    collected = _Collected(stats=stats)
    with ray_session(address):
        _quiet_data(progress_bars)
        shared = Shared.start(store)
        rows = evaluate(
            _items_dataset(items),
            job,
            shared=shared,
            workers=workers,
            concurrency=concurrency,
            num_cpus=num_cpus,
        )
        for fresh in _results(rows, collected):
            for r in fresh:
                data = json.loads(r["row"])
                result = ItemResult.model_validate({**data["result"], "votes": data["votes"]})
                results[r["id"]] = result
                if on_item:
                    on_item(by_id[r["id"]], result)
    for prompt_id, error in collected.errors.items():
        kind, _, message = error.partition(": ")
        results[prompt_id] = (kind, message)
        if on_item:
            on_item(by_id[prompt_id], None)
    report = asyncio.run(run_eval(items, evaluator=_Replayed.of_results(evaluator, results)))
    report.config["seconds"] = round(stats.seconds, 1)
    report.config["ray"] = {"address": address or "local"}
    return report
