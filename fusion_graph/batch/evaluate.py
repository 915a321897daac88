"""Best-of-N versus Fusion-of-N on a dataset (the paper's test-time-scaling setting).

For every prompt the pool makes ``max(N)`` candidates once (through the candidate store);
every strategy at every N uses the first N of them, so all strategies see exactly the
same candidates:

* ``single``: candidate 0 (one sample, no selection).
* ``bon-judge``, ``bon-pairwise``: Best-of-N with an LLM judge (pointwise 1-10 scores) or a
  pairwise knockout tournament. At N=1 (or with one successful candidate) the candidate
  is taken as is, without a judge call. When the judge gives no usable verdict, majority
  vote decides (counted in the ``fallbacks`` column).
* ``majority-vote``: self-consistency on the extracted answer.
* ``fusion``: Fusion-of-N, the fusor writes one answer from the N candidates (also at N=1).

Metrics, where the item has references: exact match (the extracted answer equals a
reference) and contains-answer (a reference appears, as whole words, in the extracted
answer), both after normalisation (case, punctuation, articles, thousands separators).
The extractor is pluggable (:data:`EXTRACTORS`, or any ``module:function``). And the
pairwise win-rate of each strategy against a baseline (default ``single``; otherwise the
baseline strategy at the same N), judged by an LLM in both orders: the strategy wins an
item when it gets more of the two votes, loses with fewer, ties otherwise (ties,
disagreeing orders, unparseable verdicts). Identical answers tie without a judge call.
``win_rate = (wins + ties / 2) / items``. The ``oracle`` row is the share of items where
any of the first N candidates is right: the ceiling for a selector.
"""

from __future__ import annotations

import asyncio
import csv
import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel

from fusion_graph.batch.data import PromptItem
from fusion_graph.batch.models import CandidateSet, JobStats, Pool, prompt_messages
from fusion_graph.batch.store import StoreConflictError
from fusion_graph.batch.synth import PROMPT_ID_KEY
from fusion_graph.engine import FusionEngine, build_engine
from fusion_graph.nodes.select import (
    LLMJudge,
    MajorityVote,
    PairwiseJudge,
    Selector,
    final_answer,
    parse_pairwise_output,
)
from fusion_graph.prompts import PAIRWISE_PROMPT, PromptTemplate, build_pairwise_messages
from fusion_graph.prompts import message_text as _text
from fusion_graph.state import Candidate, TokenUsage

STRATEGY_NAMES = ("single", "bon-judge", "bon-pairwise", "majority-vote", "fusion")
"""The built-in strategies, in table order."""

Outcome = Literal["win", "tie", "loss"]

# --- answers and matching ----------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    """Lower case; thousands separators, punctuation and articles (a, an, the) dropped;
    whitespace collapsed. ``"The  Eiffel-Tower!"`` -> ``"eiffel tower"``."""
    text = _THOUSANDS.sub("", text.lower())
    text = _PUNCT.sub(" ", text.replace("_", " "))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _last_number(text: str) -> str:
    found = _NUMBER.findall(_THOUSANDS.sub("", text))
    return found[-1] if found else ""


def _whole(text: str) -> str:
    return text


def final_or_whole(text: str) -> str:
    """:func:`~fusion_graph.nodes.select.final_answer` (the ``\\boxed{}`` / ``####`` /
    "answer is" part, normalised), or the whole reply when that part is empty (e.g. "The
    answer is:" followed by a line break)."""
    found = final_answer(text)
    return found if normalize(found) else text


Extractor = Callable[[str], str]
"""Turns a model's reply into the answer that is scored (and voted on)."""

EXTRACTORS: dict[str, Extractor] = {
    "final": final_or_whole,
    "text": _whole,
    "first-line": _first_line,
    "last-line": _last_line,
    "number": _last_number,
}
"""Built-in extractors: ``final`` (the ``\\boxed{}`` / ``####`` / "answer is" part when
present and not empty, else the whole reply; the default), ``text`` (the whole reply),
``first-line``, ``last-line``, ``number`` (the last number)."""


def get_extractor(name: str) -> Extractor:
    """A built-in extractor by name, or ``package.module:function``."""
    if name in EXTRACTORS:
        return EXTRACTORS[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        msg = (
            f"unknown extractor {name!r}: use one of {', '.join(EXTRACTORS)} or "
            "package.module:function"
        )
        raise ValueError(msg)
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        msg = f"cannot load extractor {name!r}: {exc}"
        raise ValueError(msg) from None
    if not callable(function):
        msg = f"extractor {name!r} is not callable"
        raise ValueError(msg)
    return function  # type: ignore[no-any-return]


def exact_match(
    answer: str, references: Sequence[str], extract: Extractor = final_or_whole
) -> bool:
    """The extracted answer equals a reference (both normalised)."""
    got = normalize(extract(answer))
    return bool(got) and any(got == normalize(r) for r in references)


def contains_answer(
    answer: str, references: Sequence[str], extract: Extractor = final_or_whole
) -> bool:
    """A reference appears, as whole words, in the extracted answer (both normalised)."""
    got = f" {normalize(extract(answer))} "
    return any(normalize(r) and f" {normalize(r)} " in got for r in references)


# --- pairwise win-rate ---------------------------------------------------------------------------


def combine_verdicts(forward: str | None, backward: str | None) -> Outcome:
    """One item's outcome for the strategy from the judge's two verdicts: ``forward``
    with the strategy's answer shown as A, ``backward`` with it shown as B."""
    mine = (forward == "A") + (backward == "B")
    theirs = (forward == "B") + (backward == "A")
    if mine > theirs:
        return "win"
    if mine < theirs:
        return "loss"
    return "tie"


def win_rate(wins: int, ties: int, losses: int) -> float | None:
    """``(wins + ties / 2) / total``; ``None`` with nothing judged."""
    total = wins + ties + losses
    return (wins + ties / 2) / total if total else None


@dataclass(frozen=True, kw_only=True)
class PairVerdict:
    outcome: Outcome
    judged: bool
    """False when decided without the judge (identical or missing answers)."""
    verdicts: tuple[str | None, str | None] = (None, None)
    usage: TokenUsage | None = None


def _as_candidate(text: str, label: int) -> Candidate:
    return Candidate(index=label, model="answer", message=AIMessage(content=text), text=text)


async def judge_pair(
    judge: Runnable[Any, Any],
    conversation: Sequence[BaseMessage],
    answer: str | None,
    baseline: str | None,
    *,
    config: RunnableConfig | None = None,
    prompt: PromptTemplate = PAIRWISE_PROMPT,
) -> PairVerdict:
    """The strategy's ``answer`` against the ``baseline`` answer, judged in both orders."""
    if answer is None or baseline is None:
        outcome: Outcome = "tie" if answer is baseline else ("loss" if answer is None else "win")
        return PairVerdict(outcome=outcome, judged=False)
    if normalize(answer) == normalize(baseline):
        return PairVerdict(outcome="tie", judged=False)
    mine, theirs = _as_candidate(answer, 0), _as_candidate(baseline, 1)

    async def ask(first: Candidate, second: Candidate) -> tuple[str | None, TokenUsage | None]:
        messages = build_pairwise_messages(prompt, conversation, first, second)
        try:
            reply = await judge.ainvoke(messages, config)
        except Exception:
            return None, None
        text = _text(reply) if isinstance(reply, BaseMessage) else str(reply)
        usage = TokenUsage.of(reply) if isinstance(reply, AIMessage) else None
        return parse_pairwise_output(text), usage

    (forward, u1), (backward, u2) = await asyncio.gather(ask(mine, theirs), ask(theirs, mine))
    usages = [u for u in (u1, u2) if u is not None]
    return PairVerdict(
        outcome=combine_verdicts(forward, backward),
        judged=True,
        verdicts=(forward, backward),
        usage=sum(usages, TokenUsage()) if usages else None,
    )


# --- strategies ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """How N candidates become one answer in an evaluation."""

    name: str
    kind: Literal["single", "best_of_n", "fusion"]
    engine: FusionEngine | None = None

    @classmethod
    def single(cls) -> Strategy:
        return cls(name="single", kind="single")

    @classmethod
    def best_of_n(
        cls,
        name: str,
        selector: Selector,
        *,
        anchor: Runnable[Any, Any],
        fallback: Selector | None = None,
    ) -> Strategy:
        """``anchor``: any Runnable (the engine needs a generator; it is never called).
        ``fallback``: decides when the selector fails (default: majority vote)."""
        engine = build_engine(
            anchor,
            n=1,
            strategy="best_of_n",
            selector=selector,
            fallback=fallback if fallback is not None else "default",
        )
        return cls(name=name, kind="best_of_n", engine=engine)

    @classmethod
    def fusion(cls, name: str, fusor: Runnable[Any, Any]) -> Strategy:
        engine = build_engine(fusor, n=1, strategy="fusion", fusor=fusor)
        return cls(name=name, kind="fusion", engine=engine)


def default_strategies(
    names: Sequence[str],
    *,
    judge: Runnable[Any, Any] | None,
    fusor: Runnable[Any, Any] | None,
    extract: Extractor = final_or_whole,
) -> list[Strategy]:
    """The built-in strategies named (see :data:`STRATEGY_NAMES`)."""
    out: list[Strategy] = []
    anchor = fusor or judge
    vote = MajorityVote(extract=lambda text: normalize(extract(text)))
    for name in names:
        if name == "single":
            out.append(Strategy.single())
        elif name == "majority-vote":
            if anchor is None:
                msg = "majority-vote needs a fusor or judge model to anchor its engine"
                raise ValueError(msg)
            out.append(Strategy.best_of_n(name, vote, anchor=anchor))
        elif name in ("bon-judge", "bon-pairwise"):
            if judge is None:
                msg = f"{name} needs a judge model"
                raise ValueError(msg)
            selector: Selector = LLMJudge(judge) if name == "bon-judge" else PairwiseJudge(judge)
            out.append(Strategy.best_of_n(name, selector, anchor=judge, fallback=vote))
        elif name == "fusion":
            if fusor is None:
                msg = "fusion needs a fusor model"
                raise ValueError(msg)
            out.append(Strategy.fusion(name, fusor))
        else:
            msg = f"unknown strategy {name!r}: choose from {', '.join(STRATEGY_NAMES)}"
            raise ValueError(msg)
    return out


# --- results ------------------------------------------------------------------------------------


class CandidateRecord(BaseModel):
    index: int
    model: str
    text: str | None
    error: str | None
    replayed: bool
    exact: bool | None = None
    contains: bool | None = None


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
    outcome: Outcome | None = None
    """Against the baseline; ``None`` for the baseline itself or without win-rates."""
    judged: bool = False
    verdicts: list[str | None] = []
    decision_tokens: int = 0
    """Tokens of the decision (fusor / judge) and of the win-rate judging."""


class ItemResult(BaseModel):
    """Everything evaluated for one item (a line of ``answers.jsonl``)."""

    id: str
    prompt: str
    references: list[str]
    candidates: list[CandidateRecord]
    answers: list[AnswerRecord]
    oracle: dict[int, dict[str, bool]]
    """For each N: whether any of the first N candidates is right (exact / contains)."""


class StrategyScore(BaseModel):
    """One row of the result table: a strategy at one N."""

    strategy: str
    n: int
    items: int
    answered: int
    with_reference: int
    exact: float | None
    contains: float | None
    wins: int = 0
    ties: int = 0
    losses: int = 0
    win_rate: float | None = None
    judged: int = 0
    """Comparisons that needed the judge (the rest were identical or missing answers)."""
    invalid_verdicts: int = 0
    """Judge verdicts that could not be parsed (they count towards ties)."""
    fallbacks: int = 0
    """Decisions made by the fallback selector after the judge/fusor failed."""
    decision_tokens: int = 0


@dataclass
class EvalReport:
    """What an evaluation produced."""

    scores: list[StrategyScore] = field(default_factory=list)
    items: list[ItemResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    """Items that could not be evaluated at all: id, reason."""
    stats: JobStats = field(default_factory=JobStats)
    config: dict[str, Any] = field(default_factory=dict)


# --- the evaluation ------------------------------------------------------------------------------


def _score(text: str | None, item: PromptItem, extract: Extractor) -> tuple[bool | None, ...]:
    if not item.references:
        return None, None
    if text is None:
        return False, False
    return (
        exact_match(text, item.references, extract),
        contains_answer(text, item.references, extract),
    )


@dataclass(frozen=True, kw_only=True)
class Evaluator:
    """Evaluates items: candidates from the pool, every strategy at every N, metrics."""

    pool: Pool
    strategies: Sequence[Strategy]
    ns: Sequence[int]
    baseline: str = "single"
    judge: Runnable[Any, Any] | None = None
    """Judges win-rates (``None``: no win-rates)."""
    extract: Extractor = final_or_whole

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

    def points(self) -> list[tuple[Strategy, int]]:
        """Every (strategy, N) evaluated; ``single`` only at N=1."""
        out: list[tuple[Strategy, int]] = []
        for strategy in self.strategies:
            for n in sorted(set(self.ns)) if strategy.kind != "single" else [1]:
                out.append((strategy, n))
        return out

    async def _answer(
        self, strategy: Strategy, n: int, item: PromptItem, cset: CandidateSet
    ) -> AnswerRecord:
        pool = cset.candidates[:n]
        ok = [c for c in pool if c.ok]
        record = AnswerRecord(strategy=strategy.name, n=n, text=None)
        if strategy.kind == "single":
            first = pool[0]
            record.text, record.selected_index = (first.text, 0) if first.ok else (None, None)
            record.error = None if first.ok else "candidate 0 failed"
        elif not ok:
            record.error = "no successful candidate"
        elif strategy.kind == "best_of_n" and len(ok) == 1:
            record.text, record.selected_index, record.method = ok[0].text, ok[0].index, "only"
        else:
            assert strategy.engine is not None
            config: RunnableConfig = {
                "metadata": {PROMPT_ID_KEY: item.id},
                "run_name": f"eval[{item.id}] {strategy.name}@{n}",
            }
            try:
                message, decision = await strategy.engine.decide_step(
                    prompt_messages(item), pool, config, sync=False
                )
            except Exception as exc:
                record.error = f"{type(exc).__name__}: {exc}"
            else:
                record.text = _text(message)
                record.selected_index = decision.selected_index
                record.fused = decision.fused
                record.fallback = decision.fallback
                record.method = decision.method
                record.decision_tokens = decision.usage.total_tokens if decision.usage else 0
        record.exact, record.contains = _score(record.text, item, self.extract)
        return record

    async def item(self, item: PromptItem) -> ItemResult:
        max_n = max(self.ns)
        cset = await self.pool.candidates(item, max_n)
        points = self.points()
        answers = list(await asyncio.gather(*(self._answer(s, n, item, cset) for s, n in points)))
        if self.judge is not None:
            by_key = {(a.strategy, a.n): a for a in answers}
            base_single = self.baseline == "single"
            compared = [
                a
                for a in answers
                if a.strategy != self.baseline
                and (self.baseline, 1 if base_single else a.n) in by_key
            ]
            verdicts = await asyncio.gather(
                *(
                    judge_pair(
                        self.judge,
                        prompt_messages(item),
                        a.text,
                        by_key[(self.baseline, 1 if base_single else a.n)].text,
                        config={"metadata": {PROMPT_ID_KEY: item.id}},
                    )
                    for a in compared
                )
            )
            for a, v in zip(compared, verdicts, strict=True):
                a.outcome, a.judged, a.verdicts = v.outcome, v.judged, list(v.verdicts)
                a.decision_tokens += v.usage.total_tokens if v.usage else 0
        candidates = []
        for c, teacher in zip(cset.candidates, cset.teachers, strict=True):
            exact, contains = _score(c.text if c.ok else None, item, self.extract)
            candidates.append(
                CandidateRecord(
                    index=c.index,
                    model=teacher,
                    text=c.text if c.ok else None,
                    error=None if c.ok else (c.error.message if c.error else "failed"),
                    replayed=c.index in cset.replayed,
                    exact=exact,
                    contains=contains,
                )
            )
        oracle: dict[int, dict[str, bool]] = {}
        if item.references:
            for n in sorted(set(self.ns)):
                oracle[n] = {
                    "exact": any(bool(c.exact) for c in candidates[:n]),
                    "contains": any(bool(c.contains) for c in candidates[:n]),
                }
        return ItemResult(
            id=item.id,
            prompt=item.prompt,
            references=list(item.references),
            candidates=candidates,
            answers=answers,
            oracle=oracle,
        )


def aggregate(
    items: Sequence[ItemResult], points: Sequence[tuple[str, int]], ns: Sequence[int]
) -> list[StrategyScore]:
    """The result table: one row per (strategy, N), then the oracle rows."""
    scores: list[StrategyScore] = []
    for name, n in points:
        records = [a for it in items for a in it.answers if a.strategy == name and a.n == n]
        referenced = [a for a in records if a.exact is not None]
        wins = sum(a.outcome == "win" for a in records)
        ties = sum(a.outcome == "tie" for a in records)
        losses = sum(a.outcome == "loss" for a in records)
        scores.append(
            StrategyScore(
                strategy=name,
                n=n,
                items=len(records),
                answered=sum(a.text is not None for a in records),
                with_reference=len(referenced),
                exact=(
                    sum(bool(a.exact) for a in referenced) / len(referenced) if referenced else None
                ),
                contains=(
                    sum(bool(a.contains) for a in referenced) / len(referenced)
                    if referenced
                    else None
                ),
                wins=wins,
                ties=ties,
                losses=losses,
                win_rate=win_rate(wins, ties, losses),
                judged=sum(a.judged for a in records),
                invalid_verdicts=sum(
                    sum(v is None for v in a.verdicts) for a in records if a.judged
                ),
                fallbacks=sum(a.fallback for a in records),
                decision_tokens=sum(a.decision_tokens for a in records),
            )
        )
    referenced_items = [it for it in items if it.references]
    if referenced_items:
        for n in sorted(set(ns)):
            total = len(referenced_items)
            scores.append(
                StrategyScore(
                    strategy="oracle",
                    n=n,
                    items=total,
                    answered=total,
                    with_reference=total,
                    exact=sum(it.oracle[n]["exact"] for it in referenced_items) / total,
                    contains=sum(it.oracle[n]["contains"] for it in referenced_items) / total,
                )
            )
    return scores


ItemEvent = Callable[[PromptItem, ItemResult | None], None]


async def run_eval(
    items: Sequence[PromptItem],
    *,
    evaluator: Evaluator,
    concurrency: int = 2,
    on_item: ItemEvent | None = None,
) -> EvalReport:
    """Evaluate every item, ``concurrency`` at a time; the table in ``report.scores``."""
    report = EvalReport(stats=evaluator.pool.stats)
    results: dict[str, ItemResult] = {}
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            try:
                result: ItemResult | None = await evaluator.item(item)
            except StoreConflictError:
                raise
            except Exception as exc:
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
    report.scores = aggregate(report.items, points, evaluator.ns)
    return report


# --- files ----------------------------------------------------------------------------------------

CSV_FIELDS = list(StrategyScore.model_fields)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def table_rows(scores: Sequence[StrategyScore]) -> list[list[str]]:
    """The result table as text cells (the terminal table and ``eval.md``)."""
    rows = []
    for s in scores:
        wtl = f"{s.wins}/{s.ties}/{s.losses}" if s.win_rate is not None else ""
        rows.append(
            [
                s.strategy,
                str(s.n),
                _pct(s.exact),
                _pct(s.contains),
                _pct(s.win_rate),
                wtl,
                f"{2 * s.judged - s.invalid_verdicts}/{2 * s.judged}"
                if s.win_rate is not None
                else "",
                str(s.fallbacks) if s.strategy != "oracle" else "",
            ]
        )
    return rows


TABLE_HEADER = [
    "strategy",
    "N",
    "exact",
    "contains",
    "win-rate",
    "W/T/L",
    "verdicts",
    "fallback",
]
"""Columns of the result table: exact-match and contains-answer accuracy, win-rate against
the baseline with wins/ties/losses, judge verdicts parsed / asked (two per judged
comparison; identical answers are not judged), decisions taken by the fallback selector."""


def markdown_table(scores: Sequence[StrategyScore]) -> str:
    """The result table in Markdown."""
    lines = [
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join("---" for _ in TABLE_HEADER) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(scores)]
    return "\n".join(lines) + "\n"


def write_results(report: EvalReport, out: Path) -> dict[str, Path]:
    """``eval.json`` (config, table, counters), ``eval.csv`` and ``eval.md`` (the table)
    and ``answers.jsonl`` (every item's candidates and answers) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "eval.json",
        "csv": out / "eval.csv",
        "markdown": out / "eval.md",
        "answers": out / "answers.jsonl",
    }
    paths["markdown"].write_text(markdown_table(report.scores))
    payload = {
        "config": report.config,
        "scores": [s.model_dump(mode="json") for s in report.scores],
        "failed_items": [{"id": i, "reason": r} for i, r in report.failed],
        "stats": report.stats.as_dict(),
    }
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for score in report.scores:
            writer.writerow(score.model_dump(mode="json"))
    with paths["answers"].open("w", encoding="utf-8") as handle:
        for item in report.items:
            handle.write(item.model_dump_json() + "\n")
    return paths


_STYLE = {
    "single": ("#555555", "--", "o"),
    "bon-judge": ("#1f77b4", "-", "s"),
    "bon-pairwise": ("#2ca02c", "-", "^"),
    "majority-vote": ("#9467bd", "-", "D"),
    "fusion": ("#d62728", "-", "o"),
    "oracle": ("#999999", ":", "x"),
}


def plot_scores(
    scores: Sequence[StrategyScore], path: Path, *, baseline: str, title: str | None = None
) -> Path:
    """A PNG of quality against N per strategy: contains-answer accuracy (when there are
    references) and win-rate against the baseline (when judged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({s.n for s in scores})
    panels: list[tuple[str, str]] = []
    if any(s.contains is not None for s in scores):
        panels.append(("contains", "accuracy (contains answer)"))
    if any(s.win_rate is not None for s in scores):
        panels.append(("win_rate", f"win-rate vs {baseline}"))
    if not panels:
        panels.append(("contains", "accuracy (contains answer)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels, strict=True):
        names = list(dict.fromkeys(s.strategy for s in scores))
        for name in names:
            rows = sorted((s for s in scores if s.strategy == name), key=lambda s: s.n)
            points = [(s.n, getattr(s, metric)) for s in rows if getattr(s, metric) is not None]
            if not points:
                continue
            color, line, marker = _STYLE.get(name, (None, "-", "o"))
            if name == "single":
                value = points[0][1]
                ax.axhline(value, color=color, linestyle="--", linewidth=1.2, label=f"{name}")
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, color=color, linestyle=line, marker=marker, label=name)
        if metric == "win_rate":
            ax.axhline(0.5, color="#bbbbbb", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("N (candidates)")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
