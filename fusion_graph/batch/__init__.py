"""Batch jobs over prompt files: synthetic data from a teacher pool (``synth``) and
Best-of-N versus Fusion-of-N evaluation (``eval``), both through a candidate store that
records every model reply once and replays it on later runs.

The command-line entry points are in :mod:`fusion_graph.batch.commands` (typer, rich);
this package itself needs neither.
"""

from fusion_graph.batch.data import PromptItem, PromptSet, builtin_eval_set, read_prompts
from fusion_graph.batch.evaluate import (
    EXTRACTORS,
    STRATEGY_NAMES,
    EvalReport,
    Evaluator,
    ItemResult,
    Strategy,
    StrategyScore,
    combine_verdicts,
    contains_answer,
    default_strategies,
    exact_match,
    judge_pair,
    normalize,
    plot_scores,
    run_eval,
    win_rate,
    write_results,
)
from fusion_graph.batch.models import (
    Defaults,
    Endpoints,
    JobStats,
    ModelHandle,
    ModelSpec,
    Pool,
    RecordedModel,
    Replica,
    build_handle,
    build_pool,
)
from fusion_graph.batch.store import CandidateStore, StoreConflictError
from fusion_graph.batch.synth import (
    OutputMismatchError,
    Synthesizer,
    SynthReport,
    SynthRow,
    prepare_output,
    run_synth,
)

__all__ = [
    "EXTRACTORS",
    "STRATEGY_NAMES",
    "CandidateStore",
    "Defaults",
    "Endpoints",
    "EvalReport",
    "Evaluator",
    "ItemResult",
    "JobStats",
    "ModelHandle",
    "ModelSpec",
    "OutputMismatchError",
    "Pool",
    "PromptItem",
    "PromptSet",
    "RecordedModel",
    "Replica",
    "StoreConflictError",
    "Strategy",
    "StrategyScore",
    "SynthReport",
    "SynthRow",
    "Synthesizer",
    "build_handle",
    "build_pool",
    "builtin_eval_set",
    "combine_verdicts",
    "contains_answer",
    "default_strategies",
    "exact_match",
    "judge_pair",
    "normalize",
    "plot_scores",
    "prepare_output",
    "read_prompts",
    "run_eval",
    "run_synth",
    "win_rate",
    "write_results",
]
