"""A job's description and its workers.

A job is described by a :class:`SynthJob` / :class:`EvalJob` (model specs and options:
small and picklable). Every worker (a Ray Data actor, :class:`SynthStage` /
:class:`EvalStage`) builds the single-machine :class:`~fusion_graph.batch.Synthesizer` /
:class:`~fusion_graph.batch.Evaluator` from it once, over the cluster's store and gate
(:mod:`fusion_graph.batch.ray.cluster`), and makes each prompt's row with the very same
code as ``fusion-graph synth|eval`` (``Synthesizer.row``, ``Evaluator.item``): the fan-out
over the teachers (one request per prompt and teacher, or one multi-sample request), then
the decisions on those candidates. So a Ray row is a single-machine row, by construction.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fusion_graph.batch.data import PromptItem, input_hash
from fusion_graph.batch.evaluate import STRATEGY_NAMES, Evaluator
from fusion_graph.batch.metrics import Extractor, final_or_whole
from fusion_graph.batch.models import Defaults, JobStats
from fusion_graph.batch.pool import JobModels, RecordedModel
from fusion_graph.batch.ray.cluster import ClusterStore, GateClient, gate_models
from fusion_graph.batch.store import CandidateStore, StoreConflictError
from fusion_graph.batch.synth import Synthesizer
from fusion_graph.models import ModelSpec
from fusion_graph.nodes.select import EarlyStop
from fusion_graph.types import TokenUsage

if TYPE_CHECKING:
    import pyarrow as pa

COUNTERS = ("requests", "generated", "replayed", "failed", "recorded_calls", "replayed_calls")
"""The :class:`~fusion_graph.batch.JobStats` counters a worker reports with its rows."""


# --- jobs ---------------------------------------------------------------------------------------


class _ClusterModels(JobModels):
    """A job's models whose remote endpoints are bounded cluster-wide (the gate)."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        defaults: Defaults,
        store: CandidateStore,
        stats: JobStats | None,
        gate: GateClient | None,
    ) -> None:
        super().__init__(specs, defaults, store, stats)
        self.gate = gate
        if gate is not None:
            gate_models(self.pool.handles, gate, defaults.endpoint_concurrency)

    def decider(
        self, text: str | None, *, role: str, temperature: float, max_tokens: int | None = None
    ) -> RecordedModel:
        model = super().decider(text, role=role, temperature=temperature, max_tokens=max_tokens)
        if self.gate is not None:
            gate_models([model.handle], self.gate, self.defaults.endpoint_concurrency)
        return model


def _key_envs(
    defaults: Defaults, specs: Sequence[ModelSpec], deciders: Sequence[str | None]
) -> set[str]:
    every = [*specs, *(ModelSpec.parse(text) for text in deciders if text is not None)]
    return {defaults.api_key_env} | {
        str(s.options["api_key_env"]) for s in every if "api_key_env" in s.options
    }


@dataclass(frozen=True, kw_only=True)
class SynthJob:
    """A ``synth`` job's models and decisions (the options of ``fusion-graph synth``)."""

    teachers: Sequence[ModelSpec]
    """The teacher pool (teacher ``i`` samples with seed ``defaults.seed + i``)."""
    defaults: Defaults
    selector: str = "judge"
    """How BoN picks: ``judge``, ``pairwise`` or ``vote``."""
    judge: str | None = None
    """The judge's spec (default: the first teacher's model)."""
    fusor: str | None = None
    """The fusor's spec (default: the first teacher's model)."""

    def api_key_envs(self) -> set[str]:
        """The environment variables holding the API keys of the job's endpoints."""
        return _key_envs(self.defaults, self.teachers, [self.judge, self.fusor])

    def build(
        self, store: CandidateStore, stats: JobStats | None = None, gate: GateClient | None = None
    ) -> Synthesizer:
        """The single-machine :class:`Synthesizer` of this job over ``store``."""
        models = _ClusterModels(self.teachers, self.defaults, store, stats, gate)
        return Synthesizer.of(models, selector=self.selector, judge=self.judge, fusor=self.fusor)


@dataclass(frozen=True, kw_only=True)
class EvalJob:
    """An ``eval`` job's models and strategies (the options of ``fusion-graph eval``)."""

    models: Sequence[ModelSpec]
    defaults: Defaults
    ns: Sequence[int]
    strategies: Sequence[str] = STRATEGY_NAMES
    baseline: str = "single"
    judge: str | None = None
    winrate_judge: str | None = None
    fusor: str | None = None
    win_rate: bool = True
    extract: Extractor = final_or_whole
    """Importable by the workers (a module-level function)."""
    early_stop: EarlyStop | None = None
    """The rule of ``majority-vote-early`` (default :class:`~fusion_graph.EarlyStop` ())."""

    def api_key_envs(self) -> set[str]:
        """The environment variables holding the API keys of the job's endpoints."""
        return _key_envs(self.defaults, self.models, [self.judge, self.winrate_judge, self.fusor])

    def build(
        self, store: CandidateStore, stats: JobStats | None = None, gate: GateClient | None = None
    ) -> Evaluator:
        """The single-machine :class:`Evaluator` of this job over ``store``."""
        return Evaluator.of(
            _ClusterModels(self.models, self.defaults, store, stats, gate),
            ns=self.ns,
            strategies=self.strategies,
            baseline=self.baseline,
            judge=self.judge,
            winrate_judge=self.winrate_judge,
            fusor=self.fusor,
            win_rate=self.win_rate,
            extract=self.extract,
            early_stop=self.early_stop,
        )


# --- the workers ------------------------------------------------------------------------------


def counters(stats: JobStats) -> dict[str, int]:
    counts = {name: int(getattr(stats, name)) for name in COUNTERS}
    counts["input_tokens"], counts["output_tokens"] = stats.input_tokens, stats.output_tokens
    return counts


def add_counters(stats: JobStats, delta: Mapping[str, int]) -> None:
    for name in COUNTERS:
        setattr(stats, name, getattr(stats, name) + int(delta.get(name, 0)))
    tokens = TokenUsage(
        input_tokens=int(delta.get("input_tokens", 0)),
        output_tokens=int(delta.get("output_tokens", 0)),
    )
    if tokens.total_tokens:
        stats.usage = TokenUsage.sum([stats.usage, tokens])


class Stage:
    """A Ray Data actor making rows for a batch of prompts, ``concurrency`` at a time, on an
    event loop of its own. Output columns: ``id``, ``row`` (the JSON row, or null),
    ``error`` (why there is no row), ``conflict`` (the error is a store conflict: the job
    stops), ``teacher_failures`` (JSON ``{teacher: failed candidates}``) and ``stats`` (JSON
    counters of the batch, on its first row)."""

    def __init__(
        self,
        job: SynthJob | EvalJob,
        *,
        store: Any,
        store_path: str,
        gate: Any,
        concurrency: int,
    ) -> None:
        self.stats = JobStats()
        self.worker = job.build(ClusterStore(store, store_path), self.stats, GateClient(gate))
        self.concurrency = max(1, concurrency)
        self.loop = asyncio.new_event_loop()

    async def one(self, item: PromptItem) -> dict[str, Any]:
        raise NotImplementedError

    async def _all(self, items: Sequence[PromptItem]) -> list[dict[str, Any]]:
        bound = asyncio.Semaphore(self.concurrency)

        async def bounded(item: PromptItem) -> dict[str, Any]:
            async with bound:
                try:
                    return await self.one(item)
                except StoreConflictError as exc:
                    return {"id": item.id, "error": str(exc), "conflict": True}
                except Exception as exc:  # one prompt's failure is data, not the job's end
                    return {"id": item.id, "error": f"{type(exc).__name__}: {exc}"}

        return list(await asyncio.gather(*(bounded(it) for it in items)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        items = [PromptItem.model_validate_json(s) for s in batch.column("item").to_pylist()]
        before = counters(self.stats)
        rows = self.loop.run_until_complete(self._all(items))
        after = counters(self.stats)
        delta = {k: after[k] - before[k] for k in after}
        return pa.table(
            {
                "id": pa.array([r["id"] for r in rows], pa.string()),
                "row": pa.array([r.get("row") for r in rows], pa.string()),
                "error": pa.array([r.get("error") for r in rows], pa.string()),
                "conflict": pa.array([bool(r.get("conflict")) for r in rows], pa.bool_()),
                "teacher_failures": pa.array(
                    [json.dumps(r.get("teacher_failures") or {}) for r in rows], pa.string()
                ),
                "stats": pa.array(
                    [json.dumps(delta) if i == 0 else None for i in range(len(rows))], pa.string()
                ),
            }
        )


class SynthStage(Stage):
    async def one(self, item: PromptItem) -> dict[str, Any]:
        assert isinstance(self.worker, Synthesizer)
        row, cset, reason = await self.worker.row(item)
        failures = Counter(c.model for c in cset.candidates if not c.ok)
        if row is None:
            return {"id": item.id, "error": reason or "unknown", "teacher_failures": failures}
        return {"id": item.id, "row": row.line(), "teacher_failures": failures}


class EvalStage(Stage):
    async def one(self, item: PromptItem) -> dict[str, Any]:
        assert isinstance(self.worker, Evaluator)
        result = await self.worker.item(item)
        votes = {k: [a.model_dump(mode="json") for a in v] for k, v in result.votes.items()}
        row = json.dumps({"result": result.model_dump(mode="json"), "votes": votes})
        return {"id": item.id, "row": row}


def item_json(batch: pa.Table) -> pa.Table:
    """Rows with ``prompt`` (and optionally ``id``, ``language_code``, ``reference``) as
    :class:`PromptItem` JSON, by the rules of a prompt file (id: else the prompt's SHA-256)."""
    import pyarrow as pa

    if "item" in batch.column_names:
        return batch.select(["item"])
    columns = batch.to_pydict()
    out = []
    for i, prompt in enumerate(columns["prompt"]):
        digest = input_hash(str(prompt))
        raw_id = columns.get("id", [None] * len(columns["prompt"]))[i]
        language = columns.get("language_code", [None] * len(columns["prompt"]))[i]
        reference = columns.get("reference", [None] * len(columns["prompt"]))[i]
        references = reference if isinstance(reference, list) else [reference]
        item = PromptItem(
            id=str(raw_id).strip() if raw_id not in (None, "") else digest,
            prompt=str(prompt),
            input_hash=digest,
            language_code=str(language) if language not in (None, "") else None,
            references=tuple(str(r).strip() for r in references if r not in (None, "")),
        )
        out.append(item.model_dump_json())
    return pa.table({"item": pa.array(out, pa.string())})
