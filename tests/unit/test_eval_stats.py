"""The statistics of ``fusion-graph eval``: bootstrap intervals on every accuracy and
win-rate, the numeric matcher, FusioN against the best BoN (paired difference and exact
McNemar), the judges' quality measured on the eval's own candidates, and the plot."""

from __future__ import annotations

import asyncio
import csv
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import RunnableLambda
from typer.testing import CliRunner

from fusion_graph.batch import CandidateStore, Evaluator, JobStats, Pool, run_eval
from fusion_graph.batch.evaluate import EvalStrategy
from fusion_graph.batch.metrics import (
    contains_answer,
    last_number,
    numeric_match,
    numeric_reference,
)
from fusion_graph.batch.paired import best_bon, fusion_vs_best_bon, paired_test
from fusion_graph.batch.records import AnswerRecord, ItemResult
from fusion_graph.batch.report import (
    aggregate,
    plot_scores,
    summary_lines,
    table_rows,
    write_results,
)
from fusion_graph.batch.stats import bootstrap, mcnemar_exact, paired_bootstrap, spearman
from fusion_graph.cli import app
from fusion_graph.messages import message_text
from fusion_graph.nodes.decide import SelectionContext
from fusion_graph.nodes.judges import LLMJudge, PairwiseJudge
from fusion_graph.nodes.select import MajorityVote
from fusion_graph.testing import CallRecorder, FakeCall, FakeChatModel
from fusion_graph.types import Candidate
from tests.unit.jobs_fakes import FakeOpenAI
from tests.unit.test_batch import handle, item, write_jsonl

# --- the bootstrap ------------------------------------------------------------------------------


def binomial_quantile(n: int, p: Fraction, q: float) -> int:
    """The smallest k with P(Binomial(n, p) <= k) >= q."""
    total = Fraction(0)
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= Fraction(q):
            return k
    return n


def test_the_interval_of_an_accuracy_is_the_binomial_percentiles() -> None:
    # 14 right of 20: a resampled accuracy is Binomial(20, 0.7) / 20, whose 2.5th and
    # 97.5th percentiles are 10 and 18 (of 20): the interval is [0.5, 0.9].
    outcomes = [1.0] * 14 + [0.0] * 6
    interval = bootstrap(outcomes)
    low = binomial_quantile(20, Fraction(7, 10), 0.025) / 20
    high = binomial_quantile(20, Fraction(7, 10), 0.975) / 20
    assert (low, high) == (0.5, 0.9)
    assert (interval.mean, interval.low, interval.high) == (0.7, low, high)
    assert (interval.items, interval.level) == (20, 0.95)


def test_the_interval_is_seeded_order_free_and_shrinks_with_more_items() -> None:
    outcomes = [1.0] * 14 + [0.0] * 6
    small = bootstrap(outcomes)
    assert bootstrap(outcomes) == small  # a rerun gives the same interval
    assert bootstrap(list(reversed(outcomes))) == small  # the order of the items is no matter
    large = bootstrap(outcomes * 10)
    assert large.mean == pytest.approx(0.7)
    assert small.low < large.low <= large.mean <= large.high < small.high
    # About 1.96 standard errors each way: sqrt(0.21 / 200) = 0.032.
    assert large.high - large.low == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 200), abs=0.02)
    assert bootstrap([1.0] * 5) == bootstrap([1.0] * 5, seed=1)  # nothing to vary
    assert (bootstrap([1.0] * 5).low, bootstrap([0.0] * 5).high) == (1.0, 0.0)


def test_a_weighted_bootstrap_is_a_ratio_of_sums() -> None:
    # Three items: credit 2 of 2 pairs, 0 of 1, 1 of 1: pooled 3 of 4.
    ratio = bootstrap([2.0, 0.0, 1.0], [2.0, 1.0, 1.0])
    assert ratio.mean == 0.75
    assert 0.0 <= ratio.low <= 0.75 <= ratio.high <= 1.0
    with pytest.raises(ValueError, match="positive weight"):
        bootstrap([1.0], [0.0])
    with pytest.raises(ValueError, match="at least one item"):
        bootstrap([])


def test_paired_bootstrap_is_the_bootstrap_of_the_differences() -> None:
    first = [1.0] * 10 + [0.0] * 10 + [1.0] * 80
    second = [0.0] * 10 + [1.0] * 15 + [1.0] * 75
    diffs = [b - a for a, b in zip(first, second, strict=True)]
    assert paired_bootstrap(first, second) == bootstrap(diffs)


def test_mcnemar_exact_is_the_two_sided_binomial_sign_test() -> None:
    assert mcnemar_exact(5, 1) == 2 * (1 + 6) / 64 == 0.21875
    assert mcnemar_exact(1, 5) == mcnemar_exact(5, 1)
    assert mcnemar_exact(10, 0) == 2 / 1024
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    # 20 discordant items, 15 / 5: 2 * P(X <= 5), X ~ Binomial(20, 1/2).
    tail = sum(math.comb(20, k) for k in range(6))
    assert mcnemar_exact(15, 5) == pytest.approx(2 * tail / 2**20)
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact(-1, 2)


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([5, 5, 5], [1, 0, 1]) is None  # a judge that gives one score: no ranking
    assert spearman([1], [1]) is None
    # Ties share their mean rank: ranks (1, 2, 3) against (1, 2.5, 2.5).
    assert spearman([1, 2, 3], [0, 1, 1]) == pytest.approx(math.sqrt(3) / 2)


# --- the numeric matcher ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "references", "expected"),
    [
        ("The answer is 4.0", ["4", "four"], True),
        ("2 + 2 = 4", ["4"], True),
        ("That makes 1,000 apples.", ["1000"], True),
        ("1000", ["1,000"], True),
        ("It is -3.", ["-3"], True),
        ("from 5-7", ["7"], True),  # a hyphen between numbers is not a minus sign
        ("It is 3.", ["-3"], False),
        ("2 or 3", ["2"], False),  # the last number counts
        ("The answer is 12", ["2"], False),
        ("four", ["4", "four"], False),  # number words are not numbers (contains has them)
        ("", ["4"], False),
        ("Paris", ["Paris"], None),  # no numeric reference: the matcher does not apply
    ],
)
def test_numeric_match(answer: str, references: list[str], expected: bool | None) -> None:
    assert numeric_match(answer, references) is expected


def test_numeric_references_and_last_number() -> None:
    assert numeric_reference(" 2.50 ") == numeric_reference("2.5")
    assert numeric_reference("1,000") == numeric_reference("1000")
    assert numeric_reference("12,34") is None and numeric_reference("4 apples") is None
    assert last_number("5-7 or 1,000") == "1000" and last_number("none") == ""
    assert last_number("x \u22125") == "-5"
    # contains is lenient where numeric is strict.
    assert contains_answer("2 or 3", ["2"]) and not numeric_match("2 or 3", ["2"])


# --- the table's intervals ------------------------------------------------------------------------


def result(
    i: int, answers: list[AnswerRecord], *, refs: tuple[str, ...] = ("Paris",)
) -> ItemResult:
    return ItemResult(
        id=f"q{i}",
        prompt="?",
        references=list(refs),
        candidates=[],
        answers=answers,
        oracle={1: {"exact": False, "contains": i % 2 == 0, "numeric": None}},
    )


def answer(strategy: str, ok: bool, **extra: Any) -> AnswerRecord:
    return AnswerRecord(
        strategy=strategy, n=1, text="x", exact=False, contains=ok, numeric=None, **extra
    )


def test_every_accuracy_and_win_rate_has_its_interval_in_the_table_and_files(
    tmp_path: Path,
) -> None:
    items = []
    for i in range(20):
        outcome = "win" if i < 10 else "tie" if i < 14 else "loss"
        number = ("4",) if i < 5 else ("Paris",)
        mine = answer("a", i < 14, outcome=outcome, judged=True, verdicts=["A", "B"])
        if number == ("4",):
            mine.numeric = i < 4  # 4 of the 5 numeric items
        items.append(result(i, [mine], refs=number))
    scores = aggregate(items, [("a", 1)], [1])
    row = scores[0]
    assert (row.contains, row.contains_low, row.contains_high) == (0.7, 0.5, 0.9)
    assert (row.exact, row.exact_low, row.exact_high) == (0.0, 0.0, 0.0)
    assert (row.numeric, row.with_numeric_reference) == (0.8, 5)
    assert row.numeric_low is not None and row.numeric_low < 0.8 <= (row.numeric_high or 0)
    # Win-rate (10 + 4/2) / 20 = 0.6; the interval resamples 1 / 0.5 / 0 per item.
    assert row.win_rate == 0.6
    assert row.win_rate_low is not None and row.win_rate_high is not None
    assert row.win_rate_low < 0.6 < row.win_rate_high
    oracle = scores[1]
    assert (oracle.strategy, oracle.contains) == ("oracle", 0.5)
    assert oracle.contains_low is not None and oracle.contains_low < 0.5
    cells = table_rows(scores)[0]
    assert cells[2:6] == [
        "0.0% [0.0, 0.0]",
        "70.0% [50.0, 90.0]",
        f"80.0% [{100 * row.numeric_low:.1f}, {100 * (row.numeric_high or 0):.1f}]",
        f"60.0% [{100 * row.win_rate_low:.1f}, {100 * row.win_rate_high:.1f}]",
    ]

    from fusion_graph.batch.report import EvalReport

    paths = write_results(EvalReport(scores=scores, items=items), tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["scores"][0]["contains_low"] == 0.5 and data["scores"][0]["contains_high"] == 0.9
    rows = list(csv.DictReader(paths["csv"].open()))
    assert rows[0]["win_rate_low"] == str(row.win_rate_low)
    assert "| a | 1 | 0.0% [0.0, 0.0] | 70.0% [50.0, 90.0] |" in paths["markdown"].read_text()


def test_a_replayed_table_has_the_same_intervals() -> None:
    items = [result(i, [answer("a", i % 3 == 0)]) for i in range(30)]
    first = aggregate(items, [("a", 1)], [1])
    again = aggregate(list(reversed(items)), [("a", 1)], [1])
    assert [s.model_dump() for s in first] == [s.model_dump() for s in again]


# --- FusioN against the best BoN ------------------------------------------------------------------


def paired_items() -> list[ItemResult]:
    """40 items: fusion right on 30, the vote on 26 (5 only fusion, 1 only the vote), the
    judge on 20."""
    items = []
    for i in range(40):
        fusion = i < 30
        vote = i < 25 or i == 35
        items.append(
            result(
                i,
                [
                    answer("bon-judge", i < 20),
                    answer("majority-vote", vote),
                    answer("fusion", fusion),
                ],
            )
        )
    return items


def test_the_best_bon_is_the_most_accurate_at_that_n() -> None:
    items = paired_items()
    scores = aggregate(items, [("bon-judge", 1), ("majority-vote", 1), ("fusion", 1)], [1])
    assert best_bon(scores, ["bon-judge", "majority-vote"], 1, "contains") == "majority-vote"
    assert best_bon(scores, ["bon-judge"], 1, "contains") == "bon-judge"
    assert best_bon(scores, ["bon-judge"], 2, "contains") is None  # not run at N=2
    # A tie goes to the first named.
    tied = aggregate(items, [("bon-judge", 1), ("majority-vote", 1)], [1])
    tied[0].contains = tied[1].contains
    assert best_bon(tied, ["majority-vote", "bon-judge"], 1, "contains") == "majority-vote"


def test_fusion_against_the_best_bon_is_a_paired_difference_and_an_exact_mcnemar() -> None:
    items = paired_items()
    scores = aggregate(items, [("bon-judge", 1), ("majority-vote", 1), ("fusion", 1)], [1])
    tests = fusion_vs_best_bon(
        items, scores, fusion=["fusion"], bon=["bon-judge", "majority-vote"], ns=[1]
    )
    assert len(tests) == 1
    test = tests[0]
    assert (test.bon, test.fusion_only, test.bon_only) == ("majority-vote", 5, 1)
    assert test.difference == pytest.approx(4 / 40)
    assert (test.fusion_accuracy, test.bon_accuracy) == (0.75, 0.65)
    assert test.p_value == mcnemar_exact(5, 1) == 0.21875
    fusion = [float(i < 30) for i in range(40)]
    vote = [float(i < 25 or i == 35) for i in range(40)]
    interval = paired_bootstrap(vote, fusion)
    assert (test.low, test.high) == (interval.low, interval.high)
    assert test.low <= test.difference <= test.high
    assert test.line() == (
        f"N=1: fusion - majority-vote = +10.0 pts [{100 * test.low:+.1f}, "
        f"{100 * test.high:+.1f}], discordant 5/1, McNemar p = 0.22"
    )
    # Items without references (answers not scored) are not paired.
    unscored = [AnswerRecord(strategy=name, n=1, text="x") for name in ("fusion", "bon-judge")]
    assert paired_test([result(0, unscored, refs=())], "fusion", "bon-judge", 1, "contains") is None


# --- the judges' quality on the eval's own candidates ---------------------------------------------

GEN = {0: "It is Lyon.", 1: "Paris", 2: "Paris!", 3: "Marseille"}


def logprob_reply(digit: str, alternatives: dict[str, float]) -> AIMessage:
    """A verdict that wrote ``digit``, with the score token's alternatives."""
    content = [
        {"token": '{"score": ', "logprob": 0.0, "top_logprobs": []},
        {
            "token": digit,
            "logprob": math.log(alternatives[digit]),
            "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in alternatives.items()],
        },
        {"token": "}", "logprob": 0.0, "top_logprobs": []},
    ]
    return AIMessage(
        content=f'{{"score": {digit}}}', response_metadata={"logprobs": {"content": content}}
    )


def undecided_judge(calls: list[str]) -> RunnableLambda[Any, AIMessage]:
    """Writes 5 for every answer (no discrimination in the digit), but its probabilities
    lean to 9 for an answer saying Paris and to 2 otherwise; no verdict on Marseille."""

    def reply(messages: list[BaseMessage]) -> AIMessage:
        fenced = "\n".join(message_text(m) for m in messages).split("<candidate", 1)[-1]
        calls.append(fenced)
        if "Marseille" in fenced:
            return AIMessage(content="no idea")
        if "Paris" in fenced:
            return logprob_reply("5", {"5": 0.4, "9": 0.6})  # expected 7.4
        return logprob_reply("5", {"5": 0.6, "2": 0.4})  # expected 3.8

    return RunnableLambda(reply)


def pairwise_reply(call: FakeCall) -> str:
    """Prefers the first shown, but says nothing readable when that one is "Paris!" or
    "Marseille"."""
    shown = call.prompt.split('<candidate label="A">', 1)[-1].split("</candidate>", 1)[0]
    return "gibberish" if "!" in shown or "Marseille" in shown else '{"winner": "A"}'


def judged_eval(tmp_path: Path, calls: list[str]) -> Any:
    stats = JobStats()
    generator = FakeChatModel(replies=lambda c: GEN[c.kwargs["seed"]])
    judge = undecided_judge(calls)
    bad_pairwise = FakeChatModel(replies=pairwise_reply)
    with CandidateStore(tmp_path / "s.sqlite") as db:
        evaluator = Evaluator(
            pool=Pool([handle(generator, name="gen")], db, stats),
            strategies=[
                EvalStrategy.single(),
                EvalStrategy.best_of_n("bon-judge", LLMJudge(judge), fallback=MajorityVote()),
                EvalStrategy.best_of_n(
                    "bon-pairwise", PairwiseJudge(bad_pairwise), fallback=MajorityVote()
                ),
                EvalStrategy.best_of_n("majority-vote", MajorityVote()),
            ],
            ns=[1, 2, 4],
        )
        items = [
            item("Capital of France?", id="fr", refs=("Paris",)),
            item("Capital of France, again?", id="fr2", refs=("Paris",)),
        ]
        return asyncio.run(run_eval(items, evaluator=evaluator))


def test_judge_quality_measures_both_scorings_from_the_same_replies(tmp_path: Path) -> None:
    calls: list[str] = []
    report = judged_eval(tmp_path, calls)
    # Every verdict was asked once per decision: N=2 (2 candidates) and N=4 (4), two items;
    # watching the judge made no call of its own.
    assert len(calls) == 2 * (2 + 4)
    quality = {j.strategy: j for j in report.judges}
    pointwise = quality["bon-judge"]
    assert (pointwise.asked, pointwise.valid) == (12, 10)  # Marseille twice at N=4
    assert pointwise.valid_rate == pytest.approx(10 / 12)
    assert (pointwise.n, pointwise.mixed_items) == (4, 2)
    sampled, expected = pointwise.sampled, pointwise.expected
    assert sampled is not None and expected is not None
    # Per item: right {Paris, Paris!} x wrong {Lyon, Marseille} = 4 pairs, 2 with both scored.
    assert (sampled.pairs, sampled.scored_pairs, sampled.candidates) == (8, 4, 6)
    # The written digit is 5 for all: every pair ties (0.5) and nothing ranks.
    assert sampled.pairwise_accuracy == 0.5 and sampled.spearman is None
    # The probability-weighted score puts each right answer above each wrong one.
    assert expected.pairwise_accuracy == 1.0 and expected.spearman == pytest.approx(1.0)
    assert (expected.low, expected.high) == (1.0, 1.0)
    assert expected.with_logprobs == 6
    # The candidate scores are in answers.jsonl, both ways.
    bon4 = next(a for a in report.items[0].answers if a.strategy == "bon-judge" and a.n == 4)
    by_index = {s.index: (s.sampled, s.expected) for s in bon4.judge_scores}
    assert by_index[1] == (5.0, pytest.approx(7.4)) and by_index[3] == (None, None)
    assert bon4.selected_index == 1 and not bon4.fallback  # expected scoring decided
    # The tournament per item: at N=2, 0v1 (2 readable); at N=4, 0v1 (2), 2v3 (none: "Paris!"
    # and "Marseille" shown first), then 0v2 (1 of 2).
    pairwise = quality["bon-pairwise"]
    assert (pairwise.asked, pairwise.valid) == (2 * (2 + 6), 2 * (2 + 3))
    assert "win-rate" not in quality  # no win-rate judge in this evaluation


def test_judge_quality_is_printed_and_written(tmp_path: Path) -> None:
    report = judged_eval(tmp_path, [])
    lines = summary_lines(report)[1:]  # after the intervals' legend
    assert "bon-judge (pointwise): verdicts 10/12 valid (83.3%)" in lines[1]
    assert "sampled: pairwise accuracy 50.0% [50.0, 50.0] on 4/8 pairs, Spearman n/a" in lines[2]
    assert (
        "expected: pairwise accuracy 100.0% [100.0, 100.0] on 4/8 pairs, Spearman +1.00"
        in (lines[3])
    )
    paths = write_results(report, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    judged = data["judge_quality"]["bon-judge"]
    assert judged["valid_rate"] == pytest.approx(10 / 12)
    assert judged["expected"]["pairwise_accuracy"] == 1.0
    assert judged["sampled"]["spearman"] is None
    assert data["judge_quality"]["bon-pairwise"] == {
        "kind": "pairwise",
        "asked": 16,
        "valid": 10,
        "valid_rate": 0.625,
    }


def test_llm_judge_keeps_both_scores_and_selects_by_its_scoring() -> None:
    calls: list[str] = []
    judge = undecided_judge(calls)
    candidates = [Candidate.of(text, index=i) for i, text in GEN.items()]
    context = SelectionContext([HumanMessage("Capital of France?")], candidates)
    verdicts = asyncio.run(LLMJudge(judge).verdicts(context))
    assert [(v.index, v.sampled) for v in verdicts] == [(0, 5.0), (1, 5.0), (2, 5.0), (3, None)]
    assert verdicts[0].expected == pytest.approx(3.8) and verdicts[3].expected is None
    # Sampled: all tie at 5, the lowest index wins (Lyon); expected: Paris.
    assert LLMJudge(judge, scoring="sampled").selection(verdicts).index == 0
    assert LLMJudge(judge).selection(verdicts).index == 1


# --- the command and the plot ---------------------------------------------------------------------


def test_eval_command_prints_the_paired_tests_and_the_judges(
    jobs_server: FakeOpenAI, tmp_path: Path
) -> None:
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"id": "fr", "prompt": "Capital of France?", "reference": "Paris"},
         {"id": "sum", "prompt": "What is 2 + 2?", "reference": ["4", "four"]}],
    )  # fmt: skip
    out = tmp_path / "res"
    args = [
        "eval", str(data), "-m", f"vllm:{jobs_server.url}:gen", "--n", "1,2",
        "--judge", f"openai:{jobs_server.url}:judge", "--fusor", f"openai:{jobs_server.url}:fusor",
        "--out", str(out), "--retries", "0",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stdout = result.stdout
    assert "numeric" in stdout and "% [" in stdout
    assert "[low, high]: 95% bootstrap interval over items (2000 resamples, seed 0)" in stdout
    assert "numeric accuracy over the 1 items with a numeric reference" in stdout
    assert "N=2: fusion - " in stdout and "McNemar p = " in stdout
    assert "bon-judge (pointwise): verdicts" in stdout and "win-rate judge: verdicts" in stdout
    payload = json.loads((out / "eval.json").read_text())
    assert [t["n"] for t in payload["paired_tests"]["tests"]] == [1, 2]
    assert payload["paired_tests"]["metric"] == "contains"
    assert set(payload["judge_quality"]) == {"bon-judge", "bon-pairwise", "win-rate"}
    table = {(s["strategy"], s["n"]): s for s in payload["scores"]}
    assert table["fusion", 2]["with_numeric_reference"] == 1
    assert "McNemar" in (out / "eval.md").read_text()


def test_the_plot_draws_the_intervals(tmp_path: Path) -> None:
    items = paired_items()
    scores = aggregate(items, [("majority-vote", 1), ("fusion", 1)], [1])
    with_bars = plot_scores(scores, tmp_path / "bars.png", baseline="single")
    for s in scores:
        s.contains_low = s.contains_high = None
    without = plot_scores(scores, tmp_path / "plain.png", baseline="single")
    assert with_bars.read_bytes()[:4] == b"\x89PNG"
    assert with_bars.read_bytes() != without.read_bytes()


class SchemaFake(FakeChatModel):
    """A fake that says it takes a JSON schema (and so reports logprobs when asked)."""

    takes_json_schema: bool = True


@pytest.mark.parametrize(
    ("scoring", "logprobs", "asked"),
    [("expected", None, True), ("sampled", None, False), ("sampled", True, True)],
)
def test_llm_judge_asks_for_logprobs_for_either_scoring_when_told(
    scoring: Any, logprobs: bool | None, asked: bool
) -> None:
    recorder = CallRecorder()
    model = SchemaFake(replies=['{"score": 7, "rationale": "ok"}'], recorder=recorder)
    judge = LLMJudge(model, scoring=scoring, logprobs=logprobs)
    context = SelectionContext([HumanMessage("2+2?")], [Candidate.of("4", index=0)])
    (verdict,) = asyncio.run(judge.verdicts(context))
    assert verdict.sampled == 7.0
    kwargs = recorder.calls[0].kwargs
    assert "response_format" in kwargs
    assert (kwargs.get("logprobs") is True) is asked


def test_a_judge_with_no_readable_verdict_is_counted_and_the_vote_decides(tmp_path: Path) -> None:
    stats = JobStats()
    generator = FakeChatModel(replies=lambda c: GEN[c.kwargs["seed"]])
    mute = FakeChatModel(replies=["I cannot say."])
    vote = MajorityVote()
    with CandidateStore(tmp_path / "s.sqlite") as db:
        evaluator = Evaluator(
            pool=Pool([handle(generator, name="gen")], db, stats),
            strategies=[
                EvalStrategy.single(),
                EvalStrategy.best_of_n("bon-judge", LLMJudge(mute), fallback=vote),
                EvalStrategy.best_of_n("bon-pairwise", PairwiseJudge(mute), fallback=vote),
            ],
            ns=[4],
        )
        items = [item("Capital of France?", id="fr", refs=("Paris",))]
        report = asyncio.run(run_eval(items, evaluator=evaluator))
    answers = {a.strategy: a for a in report.items[0].answers}
    assert answers["bon-judge"].fallback and answers["bon-pairwise"].fallback
    assert (answers["bon-judge"].judge_asked, answers["bon-judge"].judge_valid) == (4, 0)
    assert (answers["bon-pairwise"].judge_asked, answers["bon-pairwise"].judge_valid) == (6, 0)
    quality = {j.strategy: j for j in report.judges}
    assert quality["bon-judge"].valid_rate == 0.0
    sampled = quality["bon-judge"].sampled
    assert sampled is not None and sampled.pairwise_accuracy is None and sampled.scored_pairs == 0
    assert quality["bon-judge"].expected is None  # no reply carried logprobs
