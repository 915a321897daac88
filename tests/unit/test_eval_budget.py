"""The eval's cost accounting: the early-stopping vote replayed on stored candidates
(``majority-vote-early``), samples and tokens per strategy, the
``majority-vote@fusion-budget`` rows, and the paired bootstrap interval."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fusion_graph.batch import CandidateStore, Evaluator, JobStats, Pool, RecordedModel, run_eval
from fusion_graph.batch.data import PromptItem, input_hash
from fusion_graph.batch.evaluate import (
    STRATEGY_NAMES,
    EvalStrategy,
    default_strategies,
    early_stopped,
)
from fusion_graph.batch.metrics import paired_bootstrap
from fusion_graph.batch.models import ModelHandle, Replica
from fusion_graph.batch.report import (
    AnswerRecord,
    CandidateRecord,
    EvalReport,
    ItemResult,
    StrategyScore,
    match_budget,
    table_rows,
)
from fusion_graph.cli import app
from fusion_graph.nodes.select import EarlyStop, MajorityVote
from fusion_graph.testing import CallRecorder, FakeCall, FakeChatModel
from fusion_graph.types import Candidate
from tests.unit.jobs_fakes import FakeOpenAI

PROMPT = "Capital of France?"  # 3 words: the fake model's prompt tokens

# Item "agree": all candidates say Paris; "split": Paris / Lyon alternate (no stop);
# "lead": candidate 0 says Lyon, the rest Paris.
REPLIES = {
    "agree": ["Paris"] * 8,
    "split": ["Paris", "Lyon is it"] * 4,
    "lead": ["Lyon is it"] + ["Paris"] * 7,
}


def handle(model: Any, *, name: str) -> ModelHandle:
    settings = {"temperature": 0.5, "top_p": None, "max_tokens": 16, "seed": 0}
    return ModelHandle(
        name=name, model_id=name, settings=settings, replicas=[Replica(model=model, endpoint="f")]
    )


def item(id: str) -> PromptItem:
    prompt = f"{PROMPT} ({id})"
    return PromptItem(id=id, prompt=prompt, input_hash=input_hash(prompt), references=("Paris",))


def generate(call: FakeCall) -> str:
    which = next(k for k in REPLIES if f"({k})" in call.prompt)
    return REPLIES[which][call.kwargs["seed"]]


def evaluator(
    db: CandidateStore,
    *,
    names: tuple[str, ...] = ("single", "majority-vote", "majority-vote-early", "fusion"),
    ns: tuple[int, ...] = (1, 2, 4, 8),
    fusor_usage: bool = True,
    recorder: CallRecorder | None = None,
) -> Evaluator:
    stats = JobStats()
    fused = FakeChatModel(replies=["The answer is Paris."], recorder=recorder, usage=fusor_usage)
    fusor = RecordedModel(
        handle(fused, name="fusor"),
        db,
        stats,
        role="fusor",
    )
    return Evaluator(
        pool=Pool(
            [handle(FakeChatModel(replies=generate, recorder=recorder), name="gen")], db, stats
        ),
        strategies=default_strategies(names, judge=None, fusor=fusor),
        ns=ns,
    )


def evaluate(tmp_path: Path, **kwargs: Any) -> EvalReport:
    with CandidateStore(tmp_path / "s.sqlite") as db:
        return asyncio.run(
            run_eval([item("agree"), item("split")], evaluator=evaluator(db, **kwargs))
        )


def answer(report: EvalReport, item_id: str, strategy: str, n: int) -> AnswerRecord:
    it = next(i for i in report.items if i.id == item_id)
    return next(a for a in it.answers if a.strategy == strategy and a.n == n)


def row(report: EvalReport, strategy: str, n: int) -> StrategyScore:
    return next(s for s in report.scores if s.strategy == strategy and s.n == n)


def words(text: str) -> int:
    return len(text.split())


# --- the early-stopping vote on stored candidates -------------------------------------------------


def candidates(*texts: str | None) -> list[Candidate]:
    out = []
    for i, text in enumerate(texts):
        if text is None:
            out.append(Candidate.cancelled(index=i, model="m", seed=i, cause="grace", why="x"))
        else:
            out.append(Candidate.of(text, index=i))
    return out


def test_early_stopped_stops_after_four_agreeing_answers_in_rounds_of_two() -> None:
    vote = MajorityVote(early_stop=True)
    used, why = early_stopped(candidates(*["Paris"] * 8), vote)
    # After round 1: 2-0 gives P = 0.875 < 0.95; after round 2: 4-0 gives 0.969.
    assert [c.index for c in used] == [0, 1, 2, 3]
    assert why is not None and "after 4 answers" in why


def test_early_stopped_uses_all_candidates_when_they_split() -> None:
    used, why = early_stopped(candidates(*["Paris", "Lyon"] * 4), MajorityVote(early_stop=True))
    assert len(used) == 8 and why is None


def test_early_stopped_follows_the_rule_round_size_and_failures() -> None:
    # Rounds of 3: 3-0 (P = 0.9375) goes on, 6-0 stops: 6 used.
    used, _ = early_stopped(
        candidates(*["Paris"] * 9), MajorityVote(early_stop=EarlyStop(round_size=3))
    )
    assert len(used) == 6
    # A failed candidate is used (it was started) but has no vote: 4 votes need 5 samples,
    # so 6 in rounds of 2.
    used, why = early_stopped(
        candidates("Paris", None, "Paris", "Paris", "Paris", "Paris"), MajorityVote(early_stop=True)
    )
    assert len(used) == 6 and why is None
    # A lower threshold stops sooner: 2-0 (P = 0.875) >= 0.85.
    used, _ = early_stopped(
        candidates(*["Paris"] * 8), MajorityVote(early_stop=EarlyStop(threshold=0.85))
    )
    assert len(used) == 2


def test_early_vote_strategy_needs_the_rule() -> None:
    with pytest.raises(ValueError, match="early_stop"):
        EvalStrategy.early_vote("x", MajorityVote())
    assert "majority-vote-early" in STRATEGY_NAMES


def test_eval_early_vote_uses_fewer_samples_when_candidates_agree(tmp_path: Path) -> None:
    report = evaluate(tmp_path)
    agree = answer(report, "agree", "majority-vote-early", 8)
    split = answer(report, "split", "majority-vote-early", 8)
    assert agree.samples == 4 and agree.stop_reason is not None
    assert split.samples == 8 and split.stop_reason is None
    assert answer(report, "agree", "majority-vote", 8).samples == 8
    # Same answer as the full vote here: Paris leads both.
    assert agree.contains and split.contains
    assert row(report, "majority-vote-early", 8).samples == 6.0  # (4 + 8) / 2
    assert row(report, "majority-vote", 8).samples == 8.0
    # At N=2 nothing is asked before the first round's end: both use 2.
    assert row(report, "majority-vote-early", 2).samples == 2.0


# --- tokens per strategy -------------------------------------------------------------------------


def test_tokens_per_strategy_are_the_used_candidates_plus_the_decision(tmp_path: Path) -> None:
    report = evaluate(tmp_path)
    split = next(i for i in report.items if i.id == "split")
    prompt = words(split.prompt)
    expected = [prompt + words(t) for t in REPLIES["split"]]
    assert [c.tokens for c in split.candidates] == expected

    single = answer(report, "split", "single", 1)
    assert (single.samples, single.candidate_tokens, single.decision_tokens) == (1, expected[0], 0)
    vote = answer(report, "split", "majority-vote", 4)
    assert (vote.candidate_tokens, vote.decision_tokens) == (sum(expected[:4]), 0)
    early = answer(report, "agree", "majority-vote-early", 8)
    agree_prompt = words(next(i for i in report.items if i.id == "agree").prompt)
    assert early.candidate_tokens == 4 * (agree_prompt + 1)  # four "Paris" candidates

    fused = answer(report, "split", "fusion", 4)
    assert fused.candidate_tokens == sum(expected[:4])
    # The fusor's prompt holds the candidates, so it costs more than their replies.
    assert fused.decision_tokens > sum(words(t) for t in REPLIES["split"][:4])
    assert fused.tokens == fused.candidate_tokens + fused.decision_tokens

    table = row(report, "fusion", 4)
    per_item = [answer(report, i, "fusion", 4).tokens for i in ("agree", "split")]
    assert table.tokens == sum(per_item) / 2
    fusor = [answer(report, i, "fusion", 4).decision_tokens for i in ("agree", "split")]
    assert table.decision_tokens == sum(fusor)
    cells = next(r for r in table_rows(report.scores) if r[:2] == ["fusion", "4"])
    assert cells[-2:] == ["4", f"{table.tokens:.0f}"]


def test_winrate_judging_is_not_counted_as_the_strategys_tokens(tmp_path: Path) -> None:
    judged = CallRecorder()
    with CandidateStore(tmp_path / "s.sqlite") as db:
        base = evaluator(db, names=("single", "majority-vote"), ns=(1, 4))
        judge = RecordedModel(
            handle(FakeChatModel(replies=['{"winner": "A"}'], recorder=judged), name="j"),
            db,
            JobStats(),
            role="winrate-judge",
        )
        rated = Evaluator(pool=base.pool, strategies=base.strategies, ns=base.ns, judge=judge)
        report = asyncio.run(run_eval([item("lead")], evaluator=rated))
    # single says Lyon, vote@4 Paris (3 of 4): judged in both orders.
    vote = answer(report, "lead", "majority-vote", 4)
    assert vote.judged and len(judged.calls) == 2
    assert vote.winrate_tokens > 0 and vote.decision_tokens == 0  # the vote makes no call
    assert row(report, "majority-vote", 4).winrate_tokens == vote.winrate_tokens
    assert row(report, "majority-vote", 4).tokens == vote.candidate_tokens


# --- the same-budget row -------------------------------------------------------------------------


def test_budget_row_takes_the_deepest_vote_within_fusions_tokens(tmp_path: Path) -> None:
    report = evaluate(tmp_path)
    for n in (1, 2, 4, 8):
        fusion = row(report, "fusion", n)
        budget = row(report, "majority-vote@fusion-budget", n)
        assert fusion.tokens is not None and budget.budget == fusion.tokens
        depth = int(budget.samples or 0)
        # Recompute N' by hand: the mean tokens of the first d candidates per item.
        spent = [
            sum(sum(c.tokens for c in it.candidates[:d]) for it in report.items) / 2
            for d in range(1, 9)
        ]
        fits = [d for d in range(1, 9) if spent[d - 1] <= fusion.tokens]
        assert depth == max(fits) >= n
        assert budget.tokens == spent[depth - 1] <= fusion.tokens
        if depth < 8:
            assert spent[depth] > fusion.tokens  # one more would not fit
        # Its answers are the plain vote's at depth N' on each item.
        for it in report.items:
            got = answer(report, it.id, "majority-vote@fusion-budget", n)
            assert got.samples == depth
            if depth in (1, 2, 4, 8):
                plain = answer(report, it.id, "majority-vote", depth)
                assert (got.text, got.candidate_tokens) == (plain.text, plain.candidate_tokens)
    # The fusor's prompt repeats the candidates: FusioN@2 pays for more than 2 candidates.
    assert row(report, "majority-vote@fusion-budget", 2).samples > 2
    # At N=8 the pool has no more candidates: capped, and the table says so.
    top = row(report, "majority-vote@fusion-budget", 8)
    assert top.samples == 8 and top.capped
    cells = next(r for r in table_rows(report.scores) if r[:2] == [top.strategy, "8"])
    assert cells[-2] == "8 (capped)"
    names = [s.strategy for s in report.scores]
    assert names.index("majority-vote@fusion-budget") < names.index("oracle")


def test_budget_row_with_a_fusor_that_reports_no_tokens_is_fusions_own_depth(
    tmp_path: Path,
) -> None:
    # FusioN@N then costs its N candidates only: the vote gets the same N.
    report = evaluate(tmp_path, fusor_usage=False)
    for n in (1, 2, 4, 8):
        assert row(report, "fusion", n).decision_tokens == 0
        budget = row(report, "majority-vote@fusion-budget", n)
        assert (budget.samples, budget.capped) == (n, False)


def _result(id: str, tokens: list[int], fusion_tokens: int, n: int) -> ItemResult:
    return ItemResult(
        id=id,
        prompt="p",
        references=[],
        candidates=[
            CandidateRecord(index=i, model="m", text="t", error=None, replayed=False, tokens=t)
            for i, t in enumerate(tokens)
        ],
        answers=[
            AnswerRecord(
                strategy="fusion",
                n=n,
                text="f",
                candidate_tokens=sum(tokens[:n]),
                decision_tokens=fusion_tokens - sum(tokens[:n]),
            )
        ],
        oracle={},
    )


def test_match_budget_on_means_and_the_cap() -> None:
    # Candidates of 10 tokens; FusioN@2 costs 35 and 45 tokens (mean 40): 4 candidates fit.
    items = [_result("a", [10] * 6, 35, 2), _result("b", [10] * 6, 45, 2)]
    match = match_budget(items, "fusion", 2)
    assert (match.samples, match.tokens, match.budget, match.capped) == (4, 40.0, 40.0, False)
    # A budget of 75 with a pool of 6 (60 tokens): one more candidate would fit: capped.
    items = [_result("a", [10] * 6, 75, 2)]
    assert match_budget(items, "fusion", 2).capped
    # A budget of 65: 6 used, 5 left, less than one candidate: not capped.
    items = [_result("a", [10] * 6, 65, 2)]
    match = match_budget(items, "fusion", 2)
    assert (match.samples, match.capped) == (6, False)
    # Uneven candidates: means per depth are 5, 25, 30 (a: 5, 40, 45; b: 5, 10, 15); the
    # budget is a mean too, and an equal mean fits.
    items = [_result("a", [5, 35, 5], 30, 1), _result("b", [5, 5, 5], 20, 1)]
    assert match_budget(items, "fusion", 1).samples == 2  # budget 25
    items = [_result("a", [5, 35, 5], 29, 1), _result("b", [5, 5, 5], 20, 1)]
    assert match_budget(items, "fusion", 1).samples == 1  # budget 24.5
    items = [_result("a", [5, 35, 5], 35, 1), _result("b", [5, 5, 5], 25, 1)]
    assert match_budget(items, "fusion", 1).samples == 3  # budget 30
    with pytest.raises(ValueError, match="no answers"):
        match_budget(items, "fusion", 4)


def test_no_budget_row_without_both_strategies(tmp_path: Path) -> None:
    report = evaluate(tmp_path, names=("single", "majority-vote-early", "fusion"))
    assert not any("budget" in s.strategy for s in report.scores)
    # The votes kept for the budget rows are not written to answers.jsonl.
    report = evaluate(tmp_path)
    assert "votes" not in report.items[0].model_dump()


def test_a_replayed_eval_reproduces_the_budget_rows(tmp_path: Path) -> None:
    calls = CallRecorder()
    first = evaluate(tmp_path, recorder=calls)
    made = len(calls.calls)
    again = evaluate(tmp_path, recorder=calls)
    assert len(calls.calls) == made  # candidates and fusor replayed from the store
    assert [s.model_dump() for s in again.scores] == [s.model_dump() for s in first.scores]


# --- paired bootstrap ---------------------------------------------------------------------------


def test_paired_bootstrap_mean_and_interval() -> None:
    first = [1.0] * 50 + [0.0] * 50
    same = paired_bootstrap(first, first)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    # second is right on 10 more items: +0.10, interval around it, excluding 0.
    second = [1.0] * 60 + [0.0] * 40
    diff = paired_bootstrap(first, second, resamples=4000)
    assert diff.mean == pytest.approx(0.10)
    assert 0 < diff.low < 0.10 < diff.high < 0.2
    # Binomial-ish width: sd of the mean of 10 ones in 100 is 0.03: 95 % about +-0.06.
    assert diff.high - diff.low == pytest.approx(0.118, abs=0.03)
    assert paired_bootstrap(first, second, resamples=4000) == diff  # seeded
    flipped = paired_bootstrap(second, first, resamples=4000)
    assert flipped.mean == pytest.approx(-0.10) and flipped.high < 0
    # Paired: 10 gained and 10 lost items give 0 on average, with a real spread.
    mixed = [1.0] * 10 + [0.0] * 10 + [1.0] * 80
    other = [0.0] * 10 + [1.0] * 10 + [1.0] * 80
    wide = paired_bootstrap(mixed, other, resamples=4000)
    assert wide.mean == 0.0 and wide.low < 0 < wide.high
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([], [])


# --- the eval command's early-stop options --------------------------------------------------------


def test_eval_command_takes_the_early_stop_rule(jobs_server: FakeOpenAI, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "fr", "prompt": "Capital?", "reference": "Paris"}) + "\n")
    url = jobs_server.url
    printed: list[str] = []

    def run(*extra: str) -> dict[str, Any]:
        out = tmp_path / "res"
        args = [
            "eval", str(data), "-m", f"vllm:{url}:gen", "--n", "4", "--no-win-rate",
            "--strategies", "majority-vote,majority-vote-early,fusion",
            "--fusor", f"openai:{url}:fusor", "--judge", f"openai:{url}:judge",
            "--out", str(out), "--retries", "0", *extra,
        ]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        printed.append(result.stdout)
        payload: dict[str, Any] = json.loads((out / "eval.json").read_text())
        return payload

    def samples(payload: dict[str, Any], strategy: str) -> float:
        return next(s["samples"] for s in payload["scores"] if s["strategy"] == strategy)

    # The fake server's four candidates all differ: the default rule never stops.
    default = run()
    # Piped, the table is printed whole at its own width, not cut to 80 columns.
    assert "majority-vote@fusion-budget" in printed[0] and "…" not in printed[0]
    assert samples(default, "majority-vote-early") == 4.0
    assert default["config"]["early_stop"] == {"threshold": 0.95, "round_size": 2}
    assert samples(default, "majority-vote@fusion-budget") >= 4.0
    # Rounds of 1 at 0.6: one answer (1-0, P = 0.75) settles it.
    loose = run("--early-stop-threshold", "0.6", "--early-stop-round", "1")
    assert samples(loose, "majority-vote-early") == 1.0
    assert samples(loose, "majority-vote") == 4.0


def test_eval_command_refuses_a_bad_threshold(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["eval", "--out", str(tmp_path), "--early-stop-threshold", "1"]
    )
    assert result.exit_code == 2, result.output
    assert "threshold must be in (0.5, 1)" in " ".join(result.stderr.split())
