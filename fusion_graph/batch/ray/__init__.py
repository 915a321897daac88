"""``synth`` and ``eval`` on a Ray cluster (``fusion-graph synth|eval --ray [ADDRESS]``;
``pip install 'fusion-graph[ray]'``). See docs/ray.md.

The pipeline is Ray Data: prompts -> an actor pool of workers, each making whole rows with
the single-machine code (the fan-out over the teachers, then the BoN and FusioN decisions
on those candidates) -> the driver, which appends each row to the output as batches finish.
Workers share one candidate store (an actor owning the SQLite file on the driver's node)
and a cluster-wide bound per endpoint (an actor handing out slots):
:mod:`fusion_graph.batch.ray.cluster`.

Python API (compose it with your own Ray Data steps)::

    import ray
    from fusion_graph.batch import Defaults
    from fusion_graph.batch.ray import SynthJob, synthesize
    from fusion_graph.models import ModelSpec

    ray.init()
    job = SynthJob(teachers=[ModelSpec.parse("local")],
                   defaults=Defaults(temperature=0.3, max_tokens=256))
    rows = synthesize(ray.data.read_json("prompts.jsonl"), job, store="store.sqlite")

This package imports ``ray`` only when its functions run.
"""

from fusion_graph.batch.ray.cluster import ClusterStore, EndpointGate, ray_session
from fusion_graph.batch.ray.jobs import EvalJob, SynthJob
from fusion_graph.batch.ray.pipeline import (
    Shared,
    eval_on_ray,
    evaluate,
    synth_on_ray,
    synthesize,
)

__all__ = [
    "ClusterStore",
    "EndpointGate",
    "EvalJob",
    "Shared",
    "SynthJob",
    "eval_on_ray",
    "evaluate",
    "ray_session",
    "synth_on_ray",
    "synthesize",
]
