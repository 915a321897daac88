"""What an evaluation records: each item's candidates and each strategy's answer at each
N (a line of ``answers.jsonl``), and the rows of the result table (:class:`StrategyScore`).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from fusion_graph.nodes.judges import PairOutcome


class CandidateRecord(BaseModel):
    """One candidate of one item, as scored."""

    index: int
    model: str
    text: str | None
    error: str | None
    replayed: bool
    exact: bool | None = None
    contains: bool | None = None
    numeric: bool | None = None
    """``None`` when the item has no numeric reference (see :mod:`~fusion_graph.batch.metrics`)."""
    tokens: int = 0
    """Its reported total tokens (prompt and reply; 0 when the model reports none)."""


class CandidateScore(BaseModel):
    """A pointwise judge's verdict on one candidate, read both ways from the same reply."""

    index: int
    sampled: float | None
    """The score the judge wrote (``None``: no valid verdict)."""
    expected: float | None = None
    """The probability-weighted score from the reply's logprobs (``None`` without them)."""


class AnswerRecord(BaseModel):
    """One strategy's answer at one N for one item."""

    strategy: str
    n: int
    text: str | None
    error: str | None = None
    selected_index: int | None = None
    fused: bool = False
    fallback: bool = False
    method: str | None = None
    exact: bool | None = None
    contains: bool | None = None
    numeric: bool | None = None
    outcome: PairOutcome | None = None
    """Against the baseline; ``None`` for the baseline itself or without win-rates."""
    judged: bool = False
    verdicts: list[str | None] = []
    samples: int = 0
    """Candidates the strategy used: 1 for ``single``, N for the others, fewer for an
    early-stopping vote that stopped (then ``stop_reason`` says why)."""
    stop_reason: str | None = None
    candidate_tokens: int = 0
    """Tokens of the candidates used (their reported total tokens)."""
    decision_tokens: int = 0
    """Tokens of the decision calls (fusor / judge)."""
    winrate_tokens: int = 0
    """Tokens of judging this answer against the baseline's (a cost of the evaluation, not
    of the strategy)."""
    judge_asked: int = 0
    """Verdicts the strategy's own judge (pointwise or pairwise BoN) was asked for."""
    judge_valid: int = 0
    """Of those, the verdicts that could be read."""
    judge_scores: list[CandidateScore] = []
    """A pointwise judge's verdict on each candidate it judged."""

    @property
    def tokens(self) -> int:
        """What the strategy cost: candidate and decision tokens."""
        return self.candidate_tokens + self.decision_tokens


class ItemResult(BaseModel):
    """Everything evaluated for one item (a line of ``answers.jsonl``)."""

    id: str
    prompt: str
    references: list[str]
    candidates: list[CandidateRecord]
    answers: list[AnswerRecord]
    oracle: dict[int, dict[str, bool | None]]
    """For each N: whether any of the first N candidates is right (exact / contains /
    numeric; numeric ``None`` when the item has no numeric reference)."""
    votes: dict[str, list[AnswerRecord]] = Field(default_factory=dict, exclude=True)
    """A vote strategy's answer at every depth 1..max(N), for the budget rows (not written:
    the chosen depth's answers are in ``answers``)."""


class StrategyScore(BaseModel):
    """One row of the result table: a strategy at one N."""

    strategy: str
    n: int
    items: int
    answered: int
    with_reference: int
    exact: float | None
    """Exact-match accuracy over the items with references (``exact_low``/``exact_high``:
    its bootstrap 95 % interval; likewise for the other accuracies and the win-rate)."""
    exact_low: float | None = None
    exact_high: float | None = None
    contains: float | None
    contains_low: float | None = None
    contains_high: float | None = None
    numeric: float | None = None
    """Numeric accuracy over the items with a numeric reference."""
    numeric_low: float | None = None
    numeric_high: float | None = None
    with_numeric_reference: int = 0
    wins: int = 0
    ties: int = 0
    losses: int = 0
    win_rate: float | None = None
    win_rate_low: float | None = None
    win_rate_high: float | None = None
    judged: int = 0
    """Comparisons that needed the judge (the rest were identical or missing answers)."""
    invalid_verdicts: int = 0
    """Judge verdicts that could not be parsed (they count towards ties)."""
    fallbacks: int = 0
    """Decisions made by the fallback selector after the judge/fusor failed."""
    samples: float | None = None
    """Mean candidates used per item."""
    tokens: float | None = None
    """Mean tokens per item: the candidates used and the decision calls."""
    candidate_tokens: int = 0
    decision_tokens: int = 0
    winrate_tokens: int = 0
    budget: float | None = None
    """Budget rows: the mean tokens per item of the fusion row they are held to."""
    capped: bool = False
    """Budget rows: the depth was cut by the candidate pool (``max(N)``), not the budget."""
