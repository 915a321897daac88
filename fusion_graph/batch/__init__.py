"""Batch jobs over prompt files: synthetic data from a teacher pool (``synth``) and
Best-of-N versus Fusion-of-N evaluation (``eval``), both through a candidate store that
records every model reply once and replays it on later runs.

The teachers' candidates come from the fan-out of ``fusion_of_n`` (the same seeds and
candidate records), and the deciders (:class:`~fusion_graph.Fuse`,
:class:`~fusion_graph.Select`) decide directly on them. The command-line entry points
(``fusion-graph synth|eval``) are in :mod:`fusion_graph.cli.batch`; this package needs
neither typer nor rich. Less common pieces are in the submodules: ``data``, ``store``,
``models`` (handles, replicas), ``pool`` (the stored models), ``synth``, ``evaluate``,
``metrics`` (matching, extractors, win-rate) and ``report`` (the table and files).
"""

from fusion_graph.batch.data import PromptItem, builtin_eval_set, read_prompts
from fusion_graph.batch.evaluate import EvalStrategy, Evaluator, default_strategies, run_eval
from fusion_graph.batch.models import Defaults, JobStats, build_handle, build_pool
from fusion_graph.batch.pool import JobModels, Pool, RecordedModel, StoredModel
from fusion_graph.batch.report import EvalReport, plot_scores, write_results
from fusion_graph.batch.store import CandidateStore, StoreConflictError
from fusion_graph.batch.synth import OutputMismatchError, Synthesizer, SynthReport, run_synth

__all__ = [
    "CandidateStore",
    "Defaults",
    "EvalReport",
    "EvalStrategy",
    "JobModels",
    "Evaluator",
    "JobStats",
    "OutputMismatchError",
    "Pool",
    "PromptItem",
    "RecordedModel",
    "StoreConflictError",
    "StoredModel",
    "SynthReport",
    "Synthesizer",
    "build_handle",
    "build_pool",
    "builtin_eval_set",
    "default_strategies",
    "plot_scores",
    "read_prompts",
    "run_eval",
    "run_synth",
    "write_results",
]
