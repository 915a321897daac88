"""How good the evaluation's judges were, measured on the evaluation's own candidates.

While a BoN strategy decides, :class:`WatchedJudge` keeps what its judge said: each
verdict asked for and whether it could be read, and a pointwise judge's two scores of each
candidate from the same reply (the digit it wrote, and the probability-weighted expectation
where the reply carries logprobs). :func:`judge_quality` then reports, per judge strategy:

* **valid verdicts**: verdicts read / asked, over every decision the judge made (every N).
* for a pointwise judge (``bon-judge``), on its verdicts at the largest N, over the items
  whose candidates the reference splits into right and wrong (by ``contains``), for each
  scoring (``sampled``, and ``expected`` when any reply carried logprobs; a candidate
  without them keeps its sampled score, as :class:`~fusion_graph.LLMJudge` does):

  - **pairwise accuracy**: of the (right, wrong) candidate pairs within an item that both
    have a score, the share where the right one scored higher, ties counting half (0.5
    is a coin; the judge's BoN pick needs it high). Pooled over pairs, with a bootstrap
    interval over items.
  - **Spearman** correlation of the score with correctness (1/0) over those items'
    scored candidates (``None`` when every score is the same: no discrimination).

And the win-rate judge's valid verdicts (two per judged comparison).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fusion_graph.batch.records import AnswerRecord, CandidateScore, ItemResult
from fusion_graph.batch.stats import bootstrap, spearman
from fusion_graph.nodes.decide import Selection, SelectionContext, Selector
from fusion_graph.nodes.judges import LLMJudge, PairwiseJudge, Scoring

QUALITY_METRIC = "contains"
"""Which accuracy says a candidate is right, for the judges' pairwise accuracy."""


class WatchedJudge(Selector):
    """A judge that decides exactly as ``judge`` and keeps what it said, for one decision
    (make one per decision; read :attr:`asked`, :attr:`valid` and :attr:`scores` after)."""

    def __init__(self, judge: LLMJudge | PairwiseJudge) -> None:
        self.judge = judge
        self.name = judge.name
        self.asked = 0
        """Verdicts asked for."""
        self.valid = 0
        """Verdicts read."""
        self.scores: list[CandidateScore] = []
        """A pointwise judge's scores of each candidate."""

    async def select(self, context: SelectionContext) -> Selection:
        if isinstance(self.judge, LLMJudge):
            verdicts = await self.judge.verdicts(context)
            self.asked, self.valid = len(verdicts), sum(v.sampled is not None for v in verdicts)
            self.scores = [
                CandidateScore(index=v.index, sampled=v.sampled, expected=v.expected)
                for v in verdicts
            ]
            return self.judge.selection(verdicts)
        played = await self.judge.tournament(context)
        self.asked = len(played.verdicts)
        self.valid = sum(v is not None for v in played.verdicts)
        return self.judge.selection(played)


@dataclass(frozen=True, kw_only=True)
class Discrimination:
    """How well one scoring of a pointwise judge separates right from wrong candidates."""

    candidates: int
    """Scored candidates in the items with right and wrong ones."""
    pairs: int
    """(right, wrong) pairs within those items."""
    scored_pairs: int
    """Pairs where both have a score (the rest had an invalid verdict)."""
    pairwise_accuracy: float | None
    low: float | None
    high: float | None
    spearman: float | None
    with_logprobs: int
    """Candidates whose reply carried logprobs (an expected score)."""


@dataclass(frozen=True, kw_only=True)
class JudgeQuality:
    """One judge's record in the evaluation."""

    strategy: str
    """The strategy it decided for, or ``"win-rate"``."""
    kind: str
    """``"pointwise"``, ``"pairwise"`` or ``"win-rate"``."""
    asked: int
    valid: int
    n: int | None = None
    """The N its discrimination is measured at (the largest)."""
    mixed_items: int = 0
    """Items whose judged candidates the reference splits into right and wrong."""
    sampled: Discrimination | None = None
    expected: Discrimination | None = None

    @property
    def valid_rate(self) -> float | None:
        return self.valid / self.asked if self.asked else None

    def as_dict(self) -> dict[str, Any]:
        """Its entry in ``eval.json``'s ``judge_quality`` (the discrimination for a
        pointwise judge only)."""
        data: dict[str, Any] = {"kind": self.kind, "asked": self.asked, "valid": self.valid}
        data["valid_rate"] = self.valid_rate
        if self.kind == "pointwise":
            data["n"], data["mixed_items"] = self.n, self.mixed_items
            for label, d in (("sampled", self.sampled), ("expected", self.expected)):
                data[label] = asdict(d) if d is not None else None
        return data

    def lines(self) -> list[str]:
        """The printed block's lines for this judge."""
        rate = "" if self.valid_rate is None else f" ({100 * self.valid_rate:.1f}%)"
        who = "win-rate judge" if self.kind == "win-rate" else f"{self.strategy} ({self.kind})"
        head = f"{who}: verdicts {self.valid}/{self.asked} valid{rate}"
        if self.kind != "pointwise":
            return [head]
        mixed = f"items with right and wrong candidates: {self.mixed_items}"
        lines = [f"{head}; at N={self.n}, {mixed}"]
        for label, d in (("sampled", self.sampled), ("expected", self.expected)):
            if d is None:
                continue
            accuracy = (
                "n/a"
                if d.pairwise_accuracy is None
                else f"{100 * d.pairwise_accuracy:.1f}% [{100 * (d.low or 0):.1f}, "
                f"{100 * (d.high or 0):.1f}]"
            )
            rho = "n/a" if d.spearman is None else f"{d.spearman:+.2f}"
            extra = f", logprobs on {d.with_logprobs}/{d.candidates}" if label == "expected" else ""
            lines.append(
                f"  {label}: pairwise accuracy {accuracy} on {d.scored_pairs}/{d.pairs} pairs, "
                f"Spearman {rho}{extra}"
            )
        return lines


def _discrimination(
    judged: Sequence[tuple[list[CandidateScore], list[bool]]], scoring: Scoring
) -> Discrimination:
    def score(c: CandidateScore) -> float | None:
        if scoring == "expected" and c.sampled is not None and c.expected is not None:
            return c.expected
        return c.sampled

    credit: list[float] = []
    weight: list[float] = []
    pairs = scored = logprobs = 0
    xs: list[float] = []
    ys: list[float] = []
    for verdicts, right in judged:
        values = [score(v) for v in verdicts]
        logprobs += sum(v.expected is not None for v in verdicts)
        for value, ok in zip(values, right, strict=True):
            if value is not None:
                xs.append(value)
                ys.append(float(ok))
        item_credit = 0.0
        item_pairs = 0
        for a, a_ok in zip(values, right, strict=True):
            for b, b_ok in zip(values, right, strict=True):
                if not (a_ok and not b_ok):
                    continue
                pairs += 1
                if a is None or b is None:
                    continue
                item_pairs += 1
                item_credit += 1.0 if a > b else 0.5 if a == b else 0.0
        if item_pairs:
            credit.append(item_credit)
            weight.append(float(item_pairs))
            scored += item_pairs
    interval = bootstrap(credit, weight) if credit else None
    return Discrimination(
        candidates=len(xs),
        pairs=pairs,
        scored_pairs=scored,
        pairwise_accuracy=interval.mean if interval else None,
        low=interval.low if interval else None,
        high=interval.high if interval else None,
        spearman=spearman(xs, ys),
        with_logprobs=logprobs,
    )


def _records(items: Sequence[ItemResult], strategy: str) -> list[AnswerRecord]:
    return [a for it in items for a in it.answers if a.strategy == strategy]


def pointwise_quality(items: Sequence[ItemResult], strategy: str) -> JudgeQuality:
    """The pointwise judge of ``strategy``: valid verdicts over every N, discrimination at
    the largest N (see the module's description)."""
    records = _records(items, strategy)
    n = max((a.n for a in records), default=None)
    judged: list[tuple[list[CandidateScore], list[bool]]] = []
    for it in items:
        if not it.references:
            continue
        answer = next((a for a in it.answers if a.strategy == strategy and a.n == n), None)
        if answer is None or not answer.judge_scores:
            continue
        by_index = {c.index: c for c in it.candidates}
        right = [bool(getattr(by_index[v.index], QUALITY_METRIC)) for v in answer.judge_scores]
        if any(right) and not all(right):
            judged.append((answer.judge_scores, right))
    expected = _discrimination(judged, "expected")
    return JudgeQuality(
        strategy=strategy,
        kind="pointwise",
        asked=sum(a.judge_asked for a in records),
        valid=sum(a.judge_valid for a in records),
        n=n,
        mixed_items=len(judged),
        sampled=_discrimination(judged, "sampled"),
        expected=expected if expected.with_logprobs else None,
    )


def judge_quality(
    items: Sequence[ItemResult],
    *,
    pointwise: Sequence[str],
    pairwise: Sequence[str],
    win_rate: bool,
) -> list[JudgeQuality]:
    """The judges of the ``pointwise`` and ``pairwise`` BoN strategies, then the win-rate
    judge's valid verdicts (when ``win_rate``)."""
    out = [pointwise_quality(items, name) for name in pointwise]
    for name in pairwise:
        records = _records(items, name)
        out.append(
            JudgeQuality(
                strategy=name,
                kind="pairwise",
                asked=sum(a.judge_asked for a in records),
                valid=sum(a.judge_valid for a in records),
            )
        )
    if win_rate:
        judged = [a for it in items for a in it.answers if a.judged]
        out.append(
            JudgeQuality(
                strategy="win-rate",
                kind="win-rate",
                asked=sum(len(a.verdicts) for a in judged),
                valid=sum(v is not None for a in judged for v in a.verdicts),
            )
        )
    return out
