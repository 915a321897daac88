"""The strategies an evaluation compares: how N candidates become one answer.

For every prompt the pool makes ``max(N)`` candidates once (through the candidate store);
every strategy at every N uses the first N of them, so all strategies see exactly the
same candidates, and each strategy's decider (:class:`~fusion_graph.Select` or
:class:`~fusion_graph.Fuse`) decides directly on them:

* ``single``: candidate 0 (one sample, no selection).
* ``bon-judge``, ``bon-pairwise``: Best-of-N with an LLM judge (pointwise 1-10 scores) or a
  pairwise knockout tournament. At N=1 (or with one successful candidate) the candidate
  is taken as is, without a judge call. When the judge gives no usable verdict, majority
  vote decides (counted in the ``fallbacks`` column).
* ``majority-vote``: self-consistency on the extracted answer.
* ``majority-vote-early``: the early-stopping vote (``MajorityVote(early_stop=...)``,
  adaptive consistency) replayed on the stored candidates: rounds of ``round_size`` in
  index order, stopping as soon as :meth:`~fusion_graph.MajorityVote.reason_to_stop` gives
  a reason (the rule a live :class:`~fusion_graph.nodes.fanout.FanOut` asks between
  rounds), then the vote among the candidates used. Its ``samples`` say how many.
* ``fusion``: Fusion-of-N, the fusor writes one answer from the N candidates (also at N=1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from langchain_core.runnables import Runnable

from fusion_graph.batch.metrics import Extractor, final_or_whole, normalize
from fusion_graph.nodes.decide import Decider, Selector
from fusion_graph.nodes.fanout import EarlyStopping
from fusion_graph.nodes.fuse import Fuse
from fusion_graph.nodes.judges import LLMJudge, PairwiseJudge
from fusion_graph.nodes.select import EarlyStop, MajorityVote, RewardFn, Select
from fusion_graph.types import Candidate

STRATEGY_NAMES = (
    "single",
    "bon-judge",
    "bon-pairwise",
    "majority-vote",
    "majority-vote-early",
    "fusion",
)
"""The built-in strategies, in table order."""


@dataclass(frozen=True, kw_only=True)
class EvalStrategy:
    """How N candidates become one answer in an evaluation: candidate 0 as is
    (``single``), or a decider run on the candidates."""

    name: str
    kind: Literal["single", "best_of_n", "fusion"]
    decider: Decider | None = None
    early_stop: EarlyStopping | None = None
    """Decide on the candidates an early-stopping run would have made (see
    :func:`early_stopped`), not on all N."""

    @classmethod
    def single(cls) -> EvalStrategy:
        return cls(name="single", kind="single")

    @classmethod
    def best_of_n(
        cls, name: str, selector: Selector | RewardFn, *, fallback: Selector | None = None
    ) -> EvalStrategy:
        """``selector``: any selector, or a reward function ``(messages, candidate) ->
        float``. ``fallback``: decides when the selector fails (default: majority vote)."""
        decider = Select(selector, fallback=fallback if fallback is not None else MajorityVote())
        return cls(name=name, kind="best_of_n", decider=decider)

    @classmethod
    def early_vote(cls, name: str, vote: MajorityVote) -> EvalStrategy:
        """An early-stopping majority vote (``vote.early_stop`` set), replayed on the first
        N stored candidates as a live run would make them (:func:`early_stopped`)."""
        if vote.early_stop is None:
            msg = f"{name} needs MajorityVote(early_stop=...)"
            raise ValueError(msg)
        return replace(cls.best_of_n(name, vote, fallback=vote), early_stop=vote)

    @classmethod
    def fusion(cls, name: str, fusor: Runnable[Any, Any]) -> EvalStrategy:
        return cls(name=name, kind="fusion", decider=Fuse(fusor))


def default_strategies(
    names: Sequence[str],
    *,
    judge: Runnable[Any, Any] | None,
    fusor: Runnable[Any, Any] | None,
    extract: Extractor = final_or_whole,
    early_stop: EarlyStop | None = None,
) -> list[EvalStrategy]:
    """The built-in strategies named (see :data:`STRATEGY_NAMES`); ``early_stop`` is the
    rule of ``majority-vote-early`` (default :class:`~fusion_graph.EarlyStop` ())."""
    out: list[EvalStrategy] = []

    def key(text: str) -> str:
        return normalize(extract(text))

    vote = MajorityVote(extract=key)
    for name in names:
        if name == "single":
            out.append(EvalStrategy.single())
        elif name == "majority-vote":
            out.append(EvalStrategy.best_of_n(name, vote))
        elif name == "majority-vote-early":
            rule = early_stop if early_stop is not None else EarlyStop()
            out.append(EvalStrategy.early_vote(name, MajorityVote(extract=key, early_stop=rule)))
        elif name in ("bon-judge", "bon-pairwise"):
            if judge is None:
                msg = f"{name} needs a judge model"
                raise ValueError(msg)
            # logprobs: both scorings are measured on every verdict (batch.judging).
            selector: Selector = (
                LLMJudge(judge, logprobs=True) if name == "bon-judge" else PairwiseJudge(judge)
            )
            out.append(EvalStrategy.best_of_n(name, selector, fallback=vote))
        elif name == "fusion":
            if fusor is None:
                msg = "fusion needs a fusor model"
                raise ValueError(msg)
            out.append(EvalStrategy.fusion(name, fusor))
        else:
            msg = f"unknown strategy {name!r}: choose from {', '.join(STRATEGY_NAMES)}"
            raise ValueError(msg)
    return out


def early_stopped(
    candidates: Sequence[Candidate], rule: EarlyStopping
) -> tuple[list[Candidate], str | None]:
    """The candidates an early-stopping run would have made, in index order, and why it
    stopped (``None``: it made them all). As :meth:`FanOut.generate
    <fusion_graph.nodes.fanout.FanOut.generate>` does: rounds of ``rule.round_size``, and
    before each round after the first, ``rule.reason_to_stop`` on the successful ones so far."""
    used: list[Candidate] = []
    size = rule.round_size
    for start in range(0, len(candidates), size):
        why = rule.reason_to_stop([c for c in used if c.ok]) if used else None
        if why is not None:
            return used, why
        used.extend(candidates[start : start + size])
    return used, None
