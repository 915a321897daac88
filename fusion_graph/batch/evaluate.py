"""Best-of-N versus Fusion-of-N on a dataset (the paper's test-time-scaling setting).

For every prompt the pool makes ``max(N)`` candidates once (through the candidate store);
every strategy at every N (:mod:`fusion_graph.batch.strategies`) uses the first N of them,
so all strategies see exactly the same candidates.

Metrics (:mod:`fusion_graph.batch.metrics`, never a judge), where the item has references:
exact match (the extracted answer equals a reference), contains-answer (a reference
appears, as whole words, in the extracted answer) and numeric (its last number equals a
numeric reference; items with one only). And the pairwise win-rate of each strategy against
a baseline (default ``single``; otherwise the baseline strategy at the same N), judged by
an LLM in both orders: the strategy wins an item when it gets more of the two votes,
loses with fewer, ties otherwise (:func:`~fusion_graph.nodes.judges.combine_verdicts`).
Identical answers tie without a judge call. ``win_rate = (wins + ties / 2) / items``. The
``oracle`` row is the share of items where any of the first N candidates is right: the
ceiling for a selector. Every accuracy and win-rate has a bootstrap 95 % interval over
items (:mod:`fusion_graph.batch.stats`); each fusion strategy is compared with the best
BoN at each N on the same items (:mod:`fusion_graph.batch.paired`), and the BoN judges'
verdicts are measured on the candidates (:mod:`fusion_graph.batch.judging`). The table
and files are in :mod:`fusion_graph.batch.report`.

Cost: every answer records the candidates it used (``samples``) and their tokens
(``candidate_tokens``, the candidates' reported ``total_tokens``) besides its
``decision_tokens`` (fusor / judge); win-rate judging is counted apart
(``winrate_tokens``), as a cost of the evaluation, not of the strategy. With
``majority-vote`` and a fusion strategy both evaluated, each FusioN@N also gets a
``majority-vote@fusion-budget`` row: the vote over the first N' candidates, N' the largest
depth whose mean candidate tokens per item fit FusioN@N's mean tokens per item (its
candidates and its fusor), at most the pool's depth ``max(N)``
(:func:`~fusion_graph.batch.report.match_budget`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.runnables import Runnable

from fusion_graph.batch.data import PromptItem, prompt_config, prompt_messages
from fusion_graph.batch.judging import WatchedJudge, judge_quality
from fusion_graph.batch.metrics import (
    Extractor,
    contains_answer,
    exact_match,
    final_or_whole,
    judge_pair,
    numeric_match,
    numeric_reference,
)
from fusion_graph.batch.paired import fusion_vs_best_bon
from fusion_graph.batch.pool import CandidateSet, JobModels, Pool
from fusion_graph.batch.records import AnswerRecord, CandidateRecord, ItemResult
from fusion_graph.batch.report import BudgetMatch, EvalReport, aggregate, match_budget
from fusion_graph.batch.store import StoreConflictError
from fusion_graph.batch.strategies import (
    STRATEGY_NAMES,
    EvalStrategy,
    default_strategies,
    early_stopped,
)
from fusion_graph.messages import message_text
from fusion_graph.nodes.decide import Decider
from fusion_graph.nodes.judges import LLMJudge, PairwiseJudge
from fusion_graph.nodes.select import EarlyStop, Select
from fusion_graph.runtime import Caller
from fusion_graph.types import TokenUsage

__all__ = [
    "BUDGET_VOTE",
    "STRATEGY_NAMES",
    "EvalStrategy",
    "Evaluator",
    "ItemEvent",
    "add_budget_rows",
    "budget_name",
    "default_strategies",
    "early_stopped",
    "run_eval",
]

BUDGET_VOTE = "majority-vote"
"""The strategy held to each fusion strategy's token budget (when both are evaluated)."""


def budget_name(vote: str, fusion: str) -> str:
    """The row of ``vote`` at the token budget of ``fusion``: ``majority-vote@fusion-budget``."""
    return f"{vote}@{fusion}-budget"


# --- the evaluation ------------------------------------------------------------------------------


def _score(
    text: str | None, item: PromptItem, extract: Extractor
) -> tuple[bool | None, bool | None, bool | None]:
    """Exact, contains and numeric (``None`` without a numeric reference); all ``None``
    without references, all false (where they apply) without an answer."""
    if not item.references:
        return None, None, None
    numeric = numeric_match(text or "", item.references, extract)
    if text is None:
        return False, False, numeric  # numeric: False, or None without a numeric reference
    return (
        exact_match(text, item.references, extract),
        contains_answer(text, item.references, extract),
        numeric,
    )


def _watched(decider: Decider) -> tuple[Decider, WatchedJudge | None]:
    """For a BoN judge (pointwise or pairwise): the same decision with the judge watched
    (for :mod:`~fusion_graph.batch.judging`); any other decider as it is."""
    if isinstance(decider, Select) and isinstance(decider.selector, LLMJudge | PairwiseJudge):
        watch = WatchedJudge(decider.selector)
        return Select(watch, fallback=decider.fallback), watch
    return decider, None


def _tokens(usage: TokenUsage | None) -> int:
    return usage.total_tokens if usage else 0


@dataclass(frozen=True, kw_only=True)
class Evaluator:
    """Evaluates items: candidates from the pool, every strategy at every N, metrics."""

    pool: Pool
    strategies: Sequence[EvalStrategy]
    ns: Sequence[int]
    baseline: str = "single"
    judge: Runnable[Any, Any] | None = None
    """Judges win-rates (``None``: no win-rates)."""
    extract: Extractor = final_or_whole
    config: Mapping[str, Any] = field(default_factory=dict)
    """What the evaluation ran with (models and their settings), for ``eval.json``."""
    budget_rows: bool = True
    """Add the ``majority-vote@<fusion>-budget`` rows (when both strategies are evaluated)."""

    @classmethod
    def of(
        cls,
        models: JobModels,
        *,
        ns: Sequence[int],
        strategies: Sequence[str] = STRATEGY_NAMES,
        baseline: str = "single",
        judge: str | None = None,
        winrate_judge: str | None = None,
        fusor: str | None = None,
        win_rate: bool = True,
        extract: Extractor = final_or_whole,
        early_stop: EarlyStop | None = None,
    ) -> Evaluator:
        """The evaluator of a job: the built-in strategies named, the judges and the fusor
        by spec (default: the first model; the win-rate judge: the BoN judge), the rule of
        ``majority-vote-early`` (default :class:`~fusion_graph.EarlyStop` ())."""
        judge_model = models.judge(judge)
        rate_model = judge_model
        if winrate_judge is not None:
            rate_model = models.judge(winrate_judge, role="winrate-judge")
        fusor_model = models.fusor(fusor)
        handles = models.pool.handles
        config = {
            "models": [h.name for h in handles],
            "model_settings": {h.name: h.settings for h in handles},
            "judge": judge_model.handle.model_id,
            "judge_settings": judge_model.handle.settings,
            "winrate_judge": rate_model.handle.model_id if win_rate else None,
            "fusor": fusor_model.handle.model_id,
            "fusor_settings": fusor_model.handle.settings,
        }
        return cls(
            pool=models.pool,
            strategies=default_strategies(
                strategies,
                judge=judge_model,
                fusor=fusor_model,
                extract=extract,
                early_stop=early_stop,
            ),
            ns=ns,
            baseline=baseline,
            judge=rate_model if win_rate else None,
            extract=extract,
            config=config,
        )

    def __post_init__(self) -> None:
        if not self.ns or any(n < 1 for n in self.ns):
            msg = f"N must be a list of positive integers, got {list(self.ns)}"
            raise ValueError(msg)
        names = [s.name for s in self.strategies]
        if len(set(names)) != len(names):
            msg = f"strategy names must be unique, got {names}"
            raise ValueError(msg)
        if self.baseline not in names:
            msg = f"the baseline {self.baseline!r} is not among the strategies {names}"
            raise ValueError(msg)

    def points(self) -> list[tuple[EvalStrategy, int]]:
        """Every (strategy, N) evaluated; ``single`` only at N=1."""
        out: list[tuple[EvalStrategy, int]] = []
        for strategy in self.strategies:
            for n in sorted(set(self.ns)) if strategy.kind != "single" else [1]:
                out.append((strategy, n))
        return out

    def bon_strategies(self) -> list[EvalStrategy]:
        """The Best-of-N strategies FusioN is compared with: every ``best_of_n`` one but
        the early-stopping vote."""
        return [s for s in self.strategies if s.kind == "best_of_n" and s.early_stop is None]

    def budget_pairs(self) -> list[tuple[EvalStrategy, EvalStrategy]]:
        """(vote, fusion) strategy pairs that get a budget row: :data:`BUDGET_VOTE` with each
        fusion strategy, when both are evaluated (and :attr:`budget_rows`)."""
        votes = [s for s in self.strategies if s.name == BUDGET_VOTE]
        if not self.budget_rows or not votes:
            return []
        return [(votes[0], s) for s in self.strategies if s.kind == "fusion"]

    async def _answer(
        self, strategy: EvalStrategy, n: int, item: PromptItem, cset: CandidateSet
    ) -> AnswerRecord:
        pool = cset.candidates[:n]
        record = AnswerRecord(strategy=strategy.name, n=n, text=None)
        if strategy.early_stop is not None:
            pool, record.stop_reason = early_stopped(pool, strategy.early_stop)
        ok = [c for c in pool if c.ok]
        used = pool[:1] if strategy.kind == "single" else pool
        record.samples = len(used)
        record.candidate_tokens = sum(_tokens(c.usage) for c in used)
        if strategy.kind == "single":
            first = pool[0]
            record.text, record.selected_index = (first.text, 0) if first.ok else (None, None)
            record.error = None if first.ok else "candidate 0 failed"
        elif not ok:
            record.error = "no successful candidate"
        elif strategy.kind == "best_of_n" and len(ok) == 1:
            record.text, record.selected_index, record.method = ok[0].text, ok[0].index, "only"
        else:
            assert strategy.decider is not None
            config = prompt_config(item, run_name=f"eval[{item.id}] {strategy.name}@{n}")
            decider, watch = _watched(strategy.decider)
            try:
                message, decision = await decider.run(
                    prompt_messages(item), pool, config, Caller(sync=False)
                )
            except Exception as exc:  # one decision's failure is that answer's
                record.error = f"{type(exc).__name__}: {exc}"
            else:
                record.text = message_text(message)
                record.selected_index = decision.selected_index
                record.fused = decision.fused
                record.fallback = decision.fallback
                record.method = decision.method
                record.decision_tokens = _tokens(decision.usage)
            if watch is not None:
                record.judge_asked, record.judge_valid = watch.asked, watch.valid
                record.judge_scores = watch.scores
        record.exact, record.contains, record.numeric = _score(record.text, item, self.extract)
        return record

    async def _win_rates(self, item: PromptItem, answers: Sequence[AnswerRecord]) -> None:
        """Judge each answer against the baseline's (in place)."""
        assert self.judge is not None
        by_key = {(a.strategy, a.n): a for a in answers}
        base_single = self.baseline == "single"
        compared = [
            a
            for a in answers
            if a.strategy != self.baseline and (self.baseline, 1 if base_single else a.n) in by_key
        ]
        config = prompt_config(item, run_name=f"win-rate[{item.id}]")
        verdicts = await asyncio.gather(
            *(
                judge_pair(
                    self.judge,
                    prompt_messages(item),
                    a.text,
                    by_key[(self.baseline, 1 if base_single else a.n)].text,
                    config=config,
                )
                for a in compared
            )
        )
        for a, v in zip(compared, verdicts, strict=True):
            a.outcome, a.judged, a.verdicts = v.outcome, v.judged, list(v.verdicts)
            a.winrate_tokens += _tokens(v.usage)

    async def item(self, item: PromptItem) -> ItemResult:
        cset = await self.pool.candidates(item, max(self.ns))
        points = self.points()
        answers = list(await asyncio.gather(*(self._answer(s, n, item, cset) for s, n in points)))
        if self.judge is not None:
            await self._win_rates(item, answers)
        votes: dict[str, list[AnswerRecord]] = {}
        for vote, _ in self.budget_pairs():
            if vote.name not in votes:
                depths = range(1, len(cset.candidates) + 1)
                votes[vote.name] = list(
                    await asyncio.gather(*(self._answer(vote, d, item, cset) for d in depths))
                )
        candidates = []
        for c, teacher in zip(cset.candidates, cset.teachers, strict=True):
            exact, contains, numeric = _score(c.text if c.ok else None, item, self.extract)
            candidates.append(
                CandidateRecord(
                    index=c.index,
                    model=teacher,
                    text=c.text if c.ok else None,
                    error=None if c.ok else (c.error.message if c.error else "failed"),
                    replayed=c.index in cset.replayed,
                    exact=exact,
                    contains=contains,
                    numeric=numeric,
                    tokens=_tokens(c.usage),
                )
            )
        oracle: dict[int, dict[str, bool | None]] = {}
        if item.references:
            numeric = any(numeric_reference(r) is not None for r in item.references)
            for n in sorted(set(self.ns)):
                oracle[n] = {
                    "exact": any(bool(c.exact) for c in candidates[:n]),
                    "contains": any(bool(c.contains) for c in candidates[:n]),
                    "numeric": any(bool(c.numeric) for c in candidates[:n]) if numeric else None,
                }
        return ItemResult(
            id=item.id,
            prompt=item.prompt,
            references=list(item.references),
            candidates=candidates,
            answers=answers,
            oracle=oracle,
            votes=votes,
        )


def add_budget_rows(
    items: Sequence[ItemResult], evaluator: Evaluator
) -> list[tuple[str, int, BudgetMatch]]:
    """For each (vote, fusion) pair and N: the depth N' the vote can afford on FusioN@N's
    tokens per item (:func:`~fusion_graph.batch.report.match_budget`), and each item's vote
    at N' added to its answers as ``budget_name(vote, fusion)`` at N (in place)."""
    added: list[tuple[str, int, BudgetMatch]] = []
    if not items:
        return added
    for vote, fusion in evaluator.budget_pairs():
        name = budget_name(vote.name, fusion.name)
        for n in sorted(set(evaluator.ns)):
            match = match_budget(items, fusion.name, n)
            for it in items:
                chosen = it.votes[vote.name][match.samples - 1]
                it.answers.append(chosen.model_copy(update={"strategy": name, "n": n}))
            added.append((name, n, match))
    return added


ItemEvent = Callable[[PromptItem, ItemResult | None], None]
"""Progress callback: each item with its result (``None`` when it failed)."""


async def run_eval(
    items: Sequence[PromptItem],
    *,
    evaluator: Evaluator,
    concurrency: int = 2,
    on_item: ItemEvent | None = None,
) -> EvalReport:
    """Evaluate every item, ``concurrency`` at a time; the table in ``report.scores``.

    Raises:
        StoreConflictError: a prompt id is stored for another prompt text.
    """
    report = EvalReport(stats=evaluator.pool.stats, config=dict(evaluator.config))
    results: dict[str, ItemResult] = {}
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            try:
                result: ItemResult | None = await evaluator.item(item)
            except StoreConflictError:
                raise
            except Exception as exc:  # one item's failure is data, not the job's end
                report.failed.append((item.id, f"{type(exc).__name__}: {exc}"))
                result = None
            else:
                assert result is not None
                results[item.id] = result
            if on_item:
                on_item(item, result)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(items))))))
    report.items = [results[it.id] for it in items if it.id in results]
    points = [(s.name, n) for s, n in evaluator.points()]
    budgets = add_budget_rows(report.items, evaluator)
    points += [(name, n) for name, n, _ in budgets]
    matches = {(name, n): match for name, n, match in budgets}
    report.scores = aggregate(report.items, points, evaluator.ns, budgets=matches)
    report.paired = fusion_vs_best_bon(
        report.items,
        report.scores,
        fusion=[s.name for s in evaluator.strategies if s.kind == "fusion"],
        bon=[s.name for s in evaluator.bon_strategies()],
        ns=evaluator.ns,
    )
    judges = [
        (s.name, s.decider.selector)
        for s in evaluator.strategies
        if isinstance(s.decider, Select) and s.early_stop is None
    ]
    report.judges = judge_quality(
        report.items,
        pointwise=[name for name, j in judges if isinstance(j, LLMJudge)],
        pairwise=[name for name, j in judges if isinstance(j, PairwiseJudge)],
        win_rate=evaluator.judge is not None,
    )
    return report
