"""Batch jobs on fake models: prompt files, model specs, the candidate store (record and
replay), synth rows and resume, evaluation metrics and win-rate math, and both commands
end to end against a fake OpenAI-compatible server on loopback."""

from __future__ import annotations

import asyncio
import csv
import json
import re
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from typer.testing import CliRunner

from fusion_graph import fusion_of_n
from fusion_graph.batch import (
    CandidateStore,
    Defaults,
    Evaluator,
    JobStats,
    OutputMismatchError,
    Pool,
    PromptItem,
    RecordedModel,
    StoreConflictError,
    Synthesizer,
    build_handle,
    builtin_eval_set,
    default_strategies,
    plot_scores,
    read_prompts,
    run_eval,
    run_synth,
    write_results,
)
from fusion_graph.batch.data import input_hash, parse_shard, select_items
from fusion_graph.batch.metrics import (
    contains_answer,
    exact_match,
    get_extractor,
    judge_pair,
    normalize,
    win_rate,
)
from fusion_graph.batch.models import ModelHandle, Replica
from fusion_graph.batch.store import settings_hash
from fusion_graph.batch.synth import prepare_output
from fusion_graph.cli import app
from fusion_graph.integrations.openai_compat import forget_endpoint
from fusion_graph.models import ModelSpec
from fusion_graph.nodes.judges import combine_verdicts
from fusion_graph.nodes.select import MajorityVote
from fusion_graph.testing import CallRecorder, FakeCall, FakeChatModel, FakeSamplingChatModel
from tests.unit.jobs_fakes import FakeOpenAI, pairwise_judge, pointwise_or_pairwise

runner = CliRunner()

# --- helpers ----------------------------------------------------------------------------------


def item(prompt: str, *, id: str | None = None, refs: tuple[str, ...] = ()) -> PromptItem:
    digest = input_hash(prompt)
    return PromptItem(id=id or digest, prompt=prompt, input_hash=digest, references=refs)


def handle(
    model: Any, *, name: str = "fake", temperature: float = 0.5, batched: Any = None
) -> ModelHandle:
    settings = {"temperature": temperature, "top_p": None, "max_tokens": 16, "seed": 0}
    return ModelHandle(
        name=name,
        model_id=name,
        settings=settings,
        replicas=[Replica(model=model, endpoint="fake")],
        batched=batched,
    )


def by_seed(prefix: str) -> Any:
    """Replies that depend on the seed the call was given (our calls carry no index)."""
    return lambda call: f"{prefix} {call.kwargs.get('seed')}"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- prompt files ---------------------------------------------------------------------------------


def test_read_jsonl_defaults_ids_to_the_input_hash_and_keeps_extra_columns(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "What is 2 + 2?", "reference": ["4", "four"], "topic": "math"},
            {"id": 7, "prompt": "Say hi.", "language_code": "en"},
        ],
    )
    items = read_prompts(path).items
    assert items[0].id == items[0].input_hash == input_hash("What is 2 + 2?")
    assert len(items[0].input_hash) == 64
    assert items[0].references == ("4", "four")
    assert items[0].extra == {"topic": "math"}
    assert (items[1].id, items[1].language_code, items[1].references) == ("7", "en", ())


def test_read_csv_splits_references_on_bars(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as handle_:
        writer = csv.writer(handle_)
        writer.writerow(["id", "prompt", "reference"])
        writer.writerow(["a", "Capital of the UK?", "London | london city"])
        writer.writerow(["b", "Colour of grass?", ""])
    items = read_prompts(path).items
    assert [i.id for i in items] == ["a", "b"]
    assert items[0].references == ("London", "london city")
    assert items[1].references == ()


def test_duplicate_prompts_are_skipped_and_conflicting_ids_are_errors(tmp_path: Path) -> None:
    dup = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x"}, {"prompt": "y"}, {"prompt": "x"}])
    prompts = read_prompts(dup)
    assert [i.prompt for i in prompts.items] == ["x", "y"] and prompts.duplicates == 1
    bad = write_jsonl(
        tmp_path / "b.jsonl", [{"id": "1", "prompt": "x"}, {"id": "1", "prompt": "z"}]
    )
    with pytest.raises(ValueError, match=r"b\.jsonl:2: id '1' is already used by line 1"):
        read_prompts(bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [('{"question": "x"}\n', r":1: no 'prompt' text"), ("{not json\n", r":1: not valid JSON")],
)
def test_bad_rows_name_their_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_shards_partition_the_prompts() -> None:
    items = [item(f"prompt {i}") for i in range(40)]
    shards = [select_items(items, shard=(i, 3)) for i in range(3)]
    ids = [it.id for shard in shards for it in shard]
    assert sorted(ids) == sorted(it.id for it in items)
    assert all(shards)
    assert select_items(items, limit=5) == items[:5]
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_builtin_eval_set_is_shipped_and_well_formed() -> None:
    prompts = read_prompts("builtin")
    assert builtin_eval_set().is_file()
    assert 50 <= len(prompts.items) <= 200 and prompts.duplicates == 0
    assert all(i.references and i.prompt.strip() for i in prompts.items)
    categories = Counter(i.extra["category"] for i in prompts.items[:40])
    assert len(categories) >= 5  # the first items mix categories (for --limit runs)


# --- model specs ----------------------------------------------------------------------------------


def test_parse_model_specs() -> None:
    local = ModelSpec.parse("local:temperature=0.3,name=a,max_tokens=64")
    assert (local.kind, local.urls, local.model) == ("local", (), None)
    assert dict(local.options) == {"temperature": 0.3, "name": "a", "max_tokens": 64}
    remote = ModelSpec.parse("openai:http://127.0.0.1:8000/v1:Qwen/Qwen2.5-7B-Instruct")
    assert remote.urls == ("http://127.0.0.1:8000/v1",)
    assert remote.model == "Qwen/Qwen2.5-7B-Instruct" and not remote.options
    replicas = ModelSpec.parse(
        "vllm:http://a:8000/v1+https://b.example/v1:llama3:8b:concurrency=16,seed=3"
    )
    assert replicas.urls == ("http://a:8000/v1", "https://b.example/v1")
    assert replicas.model == "llama3:8b"
    assert dict(replicas.options) == {"concurrency": 16, "seed": 3}
    assert ModelSpec.parse("local").with_defaults(temperature=0.0).options == {"temperature": 0.0}
    assert local.with_defaults(temperature=0.0).options["temperature"] == 0.3
    assert local.with_options(temperature=0.0).options["temperature"] == 0.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gpt4", "must start with local, openai: or vllm:"),
        ("local:temp=1", "is not an option"),
        ("local:max_tokens=many", "max_tokens needs a int"),
        ("local:max_tokens=0", "max_tokens must be at least 1"),
        ("openai:127.0.0.1:8000:m", "expected openai:URL:MODEL"),
        ("vllm:http://h:1/v1:m:path=/x", "path= is for local models only"),
        ("local:path=/does/not/exist.gguf", "no GGUF file"),
    ],
)
def test_bad_model_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelSpec.parse(spec)


def test_handles_for_remote_specs_share_their_endpoint_bound() -> None:
    defaults = Defaults(temperature=0.3, max_tokens=32, seed=5, endpoint_concurrency=3)
    url = "http://127.0.0.1:9/v1"
    forget_endpoint(url)
    a = build_handle(ModelSpec.parse(f"vllm:{url}:m1"), defaults)
    b = build_handle(ModelSpec.parse(f"openai:{url}:m2:temperature=1"), defaults)
    # one bound per endpoint, the process-wide limiter every request to it holds a slot of
    assert a.replicas[0].model.limiter is b.replicas[0].model.limiter
    assert a.replicas[0].model.limiter.limit == 3
    assert a.settings == {"temperature": 0.3, "top_p": None, "max_tokens": 32, "seed": 5}
    assert (a.model_id, a.name, a.batched, b.batched) == ("m1", "m1", "n", None)
    assert a.settings_hash == settings_hash(a.settings) != b.settings_hash


def test_calls_go_to_the_least_busy_replica_and_are_retried() -> None:
    recorders = [CallRecorder(), CallRecorder()]
    replicas = [
        Replica(
            model=FakeChatModel(replies=["r"], recorder=rec, delay=0.05),
            endpoint=f"r{i}",
        )
        for i, rec in enumerate(recorders)
    ]
    pool = ModelHandle(name="m", model_id="m", settings={"seed": 0}, replicas=replicas, retries=1)
    stats = JobStats()

    async def four() -> list[Any]:
        return list(
            await asyncio.gather(*(pool.call([HumanMessage("q")], stats=stats) for _ in range(4)))
        )

    results = asyncio.run(four())
    assert all(r.value is not None and r.value.content == "r" for r in results)
    assert [len(r.calls) for r in recorders] == [2, 2]
    assert max(r.max_in_flight for r in recorders) <= 2

    attempts = {"n": 0}

    def once_down(call: FakeCall) -> str | BaseException:
        attempts["n"] += 1
        return ConnectionError("blip") if attempts["n"] == 1 else "back"

    flaky = ModelHandle(
        name="f",
        model_id="f",
        settings={"seed": 0},
        replicas=[Replica(FakeChatModel(replies=once_down), "f")],
        retries=1,
    )
    reply = asyncio.run(flaky.call([HumanMessage("q")], stats=stats))
    assert reply.value is not None and reply.value.content == "back" and reply.attempts == 2
    assert stats.requests == 6  # every attempt counts


# --- the store ------------------------------------------------------------------------------------


def test_store_round_trip_write_once_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    message = AIMessage(
        content="Paris",
        usage_metadata={"input_tokens": 3, "output_tokens": 1, "total_tokens": 4},
        response_metadata={"seed": 9},
    )
    key = {"prompt_id": "p1", "model": "m", "settings": "abc", "input_hash": "h"}
    with CandidateStore(path) as db:
        assert db.put_candidate(
            **key, index=2, settings_json={"t": 1}, message=message, latency_s=0.5, seed=9
        )
        again = AIMessage(content="Lyon")
        assert not db.put_candidate(
            **key, index=2, settings_json={"t": 1}, message=again, latency_s=0.1, seed=9
        )
        db.put_call("k", model="m", settings="abc", role="judge", message=message, latency_s=1)
    with CandidateStore(path) as db:
        found = db.get_candidates(indices=[0, 2], **key)
        assert list(found) == [2]
        assert found[2].message.content == "Paris" and found[2].seed == 9
        assert found[2].message.usage_metadata == message.usage_metadata
        assert db.get_call("k") == found[2].message
        assert db.get_call("other") is None
        assert db.counts() == {"candidates": 1, "calls": 1}
        with pytest.raises(StoreConflictError, match="different prompt text"):
            db.get_candidates(**{**key, "input_hash": "other"}, indices=[2])
    with sqlite3.connect(path) as raw:  # plain SQLite, readable by any client
        assert raw.execute("select text, idx from candidates").fetchall() == [("Paris", 2)]


def test_store_refuses_another_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    CandidateStore(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("update meta set value = '99' where key = 'schema'")
    with pytest.raises(ValueError, match="schema 99"):
        CandidateStore(path)


# --- pool: record and replay ----------------------------------------------------------------------


def test_pool_records_then_replays_without_calling_the_model(tmp_path: Path) -> None:
    recorder = CallRecorder()
    model = FakeChatModel(replies=by_seed("answer"), recorder=recorder)
    question = item("Name a colour.")
    with CandidateStore(tmp_path / "s.sqlite") as db:
        first = asyncio.run(Pool([handle(model)], db, JobStats()).candidates(question, 3))
        assert [c.text for c in first.candidates] == ["answer 0", "answer 1", "answer 2"]
        assert first.replayed == frozenset() and len(recorder.calls) == 3
        stats = JobStats()
        second = asyncio.run(Pool([handle(model)], db, stats).candidates(question, 3))
    assert len(recorder.calls) == 3  # no new call
    assert [c.text for c in second.candidates] == [c.text for c in first.candidates]
    assert second.replayed == frozenset({0, 1, 2})
    assert (stats.requests, stats.replayed, stats.generated) == (0, 3, 0)


def test_larger_n_generates_only_the_missing_candidates(tmp_path: Path) -> None:
    recorder = CallRecorder()
    model = FakeChatModel(replies=by_seed("a"), recorder=recorder)
    question = item("q")
    with CandidateStore(tmp_path / "s.sqlite") as db:
        asyncio.run(Pool([handle(model)], db, JobStats()).candidates(question, 2))
        more = asyncio.run(Pool([handle(model)], db, JobStats()).candidates(question, 4))
    assert sorted(c.kwargs["seed"] for c in recorder.calls) == [0, 1, 2, 3]
    assert more.replayed == frozenset({0, 1})


def test_batched_model_gets_one_call_for_its_missing_samples(tmp_path: Path) -> None:
    recorder = CallRecorder()
    model = FakeSamplingChatModel(replies=["x", "y", "z"], recorder=recorder)
    with CandidateStore(tmp_path / "s.sqlite") as db:
        cset = asyncio.run(
            Pool([handle(model, batched="sample_n")], db, JobStats()).candidates(item("q"), 3)
        )
    assert len(recorder.calls) == 1 and recorder.calls[0].kwargs["seeds"] == [0, 1, 2]
    assert [c.text for c in cset.candidates] == ["x", "y", "z"]


def test_pool_of_teachers_and_failures_are_retried_by_the_next_run(tmp_path: Path) -> None:
    fail = {"on": True}

    def flaky(call: FakeCall) -> str | BaseException:
        return RuntimeError("down") if fail["on"] else "late"

    good = FakeChatModel(replies=by_seed("good"))
    bad_recorder = CallRecorder()
    bad = FakeChatModel(replies=flaky, recorder=bad_recorder)
    handles = [handle(good, name="good"), handle(bad, name="bad")]
    question = item("q")
    with CandidateStore(tmp_path / "s.sqlite") as db:
        stats = JobStats()
        cset = asyncio.run(Pool(handles, db, stats).candidates(question, 4))
        assert cset.teachers == ["good", "bad", "good", "bad"]
        assert [c.ok for c in cset.candidates] == [True, False, True, False]
        assert cset.candidates[1].error is not None
        assert cset.candidates[1].error.message == "down"
        assert [c.seed for c in cset.candidates] == [0, 1, 2, 3]  # seed + i, as fusion_of_n
        assert (stats.generated, stats.failed) == (2, 2)
        fail["on"] = False
        again = asyncio.run(Pool(handles, db, JobStats()).candidates(question, 4))
    assert [c.text for c in again.candidates] == ["good 0", "late", "good 2", "late"]
    assert again.replayed == frozenset({0, 2})
    assert len(bad_recorder.calls) == 4  # two failed, then only those two again


def seed_of(call: FakeCall) -> int:
    """The seed a fake was given: the call's, or its sample's in a multi-sample call."""
    seeds = call.kwargs.get("seeds")
    return int(seeds[call.index] if seeds is not None else call.kwargs["seed"])


@pytest.mark.parametrize("batched", [False, True], ids=["one-call-each", "sample-n"])
def test_pool_makes_the_candidates_fusion_of_n_makes_with_the_same_pool(
    tmp_path: Path, batched: bool
) -> None:
    def teachers() -> tuple[list[FakeChatModel], list[CallRecorder]]:
        calls = [CallRecorder(), CallRecorder()]
        first = FakeSamplingChatModel if batched else FakeChatModel
        a = first(model_name="a", replies=lambda c: f"a: {seed_of(c)}", recorder=calls[0])
        b = FakeChatModel(model_name="b", replies=lambda c: f"b: {seed_of(c)}", recorder=calls[1])
        return [a, b], calls

    prompt = "Name a colour."
    models, direct_calls = teachers()
    fused = fusion_of_n(models, n=4, fusor=FakeChatModel(replies=["fused"]), seed=0)
    direct = fused.run(prompt).candidates
    (a, b), pool_calls = teachers()
    handles = [handle(a, name="a", batched="sample_n" if batched else None), handle(b, name="b")]
    with CandidateStore(tmp_path / "s.sqlite") as db:
        pool = Pool(handles, db, JobStats(), seed=0)
        pooled = asyncio.run(pool.candidates(item(prompt), 4)).candidates

    def record(c: Any) -> tuple[Any, ...]:
        return (c.index, c.model, c.seed, c.text, c.ok, c.usage)

    assert [record(c) for c in pooled] == [record(c) for c in direct]
    assert [c.seed for c in pooled] == [0, 1, 2, 3]
    assert [c.text for c in pooled] == ["a: 0", "b: 1", "a: 2", "b: 3"]
    for mine, theirs in zip(pool_calls, direct_calls, strict=True):  # the same calls, too
        assert sorted(map(str, (c.kwargs for c in mine.calls))) == sorted(
            map(str, (c.kwargs for c in theirs.calls))
        )
    assert len(pool_calls[0].calls) == (1 if batched else 2)


def test_recorded_model_replays_and_merges_identical_calls_in_flight(tmp_path: Path) -> None:
    recorder = CallRecorder()
    judge = FakeChatModel(replies=["verdict"], recorder=recorder, delay=0.05)
    with CandidateStore(tmp_path / "s.sqlite") as db:
        stats = JobStats()
        recorded = RecordedModel(handle(judge, name="judge"), db, stats, role="judge")

        async def twice() -> list[AIMessage]:
            messages = [HumanMessage("same")]
            return list(
                await asyncio.gather(recorded.ainvoke(messages), recorded.ainvoke(messages))
            )

        replies = asyncio.run(twice())
        assert [r.content for r in replies] == ["verdict", "verdict"]
        assert len(recorder.calls) == 1
        assert recorded.invoke("same").content == "verdict"  # the sync path replays too
        assert len(recorder.calls) == 1
        assert (stats.recorded_calls, stats.replayed_calls) == (1, 2)
        assert recorded.invoke("different").content == "verdict"
        assert len(recorder.calls) == 2


# --- synth ---------------------------------------------------------------------------------------


def synthesizer(db: CandidateStore, teachers: list[ModelHandle], fusor: Any) -> Synthesizer:
    stats = JobStats()
    recorded = RecordedModel(handle(fusor, name="fusor"), db, stats, role="fusor")
    return Synthesizer(Pool(teachers, db, stats), selector=MajorityVote(), fusor=recorded)


def test_synth_rows_have_the_papers_columns(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    teachers = [
        handle(FakeChatModel(replies=["Paris"]), name="alpha"),
        handle(FakeChatModel(replies=["Paris"]), name="beta"),
        handle(FakeChatModel(replies=["Lyon"]), name="gamma"),
    ]
    items = [item("Capital of France?"), item("Bonjour?", id="fr-1")]
    items[1] = items[1].model_copy(update={"language_code": "fr"})
    with CandidateStore(tmp_path / "s.sqlite") as db:
        synth = synthesizer(db, teachers, FakeChatModel(replies=["Paris (fused)"]))
        report = asyncio.run(run_synth(items, synthesizer=synth, output=out, concurrency=2))
    assert (report.written, report.already_done, report.failed) == (2, 0, [])
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    row = rows[items[0].id]
    assert list(row)[:7] == [
        "id",
        "prompt",
        "language_code",
        "input_hash",
        "alpha",
        "beta",
        "gamma",
    ]
    assert row["input_hash"] == input_hash("Capital of France?")
    assert (row["alpha"], row["gamma"]) == ("Paris", "Lyon")
    assert (row["BoN"], row["BoN_teacher"], row["BoN_selector"]) == (
        "Paris",
        "alpha",
        "majority_vote",
    )
    assert row["BoN_scores"] == pytest.approx({"alpha": 2 / 3, "beta": 2 / 3, "gamma": 1 / 3})
    assert (row["Fusion"], row["fusor"], row["Fusion_fallback"]) == ("Paris (fused)", "fusor", None)
    assert row["teachers"] == ["alpha", "beta", "gamma"] and row["failed_teachers"] == {}
    assert [c["model"] for c in row["candidates"]] == ["alpha", "beta", "gamma"]
    assert row["usage"]["output_tokens"] > 0
    assert rows["fr-1"]["language_code"] == "fr"


def test_failed_teachers_are_recorded_and_all_failed_prompts_are_retried(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    state = {"down": True}

    def sometimes(call: FakeCall) -> str | BaseException:
        return ConnectionError("refused") if state["down"] else "fine"

    always_down = handle(FakeChatModel(replies=[ConnectionError("refused")]), name="down")
    flaky = handle(FakeChatModel(replies=sometimes), name="flaky")
    ok_item, dead_item = item("q1"), item("q2")
    with CandidateStore(tmp_path / "s.sqlite") as db:
        mixed = [handle(FakeChatModel(replies=["fine"]), name="up"), always_down]
        report = asyncio.run(
            run_synth(
                [ok_item],
                synthesizer=synthesizer(db, mixed, FakeChatModel(replies=["f"])),
                output=out,
            )
        )
        row = json.loads(out.read_text())
        assert report.written == 1 and report.teacher_failures == Counter({"down": 1})
        assert row["down"] is None and row["failed_teachers"]["down"].startswith("ConnectionError")
        assert row["BoN"] == "fine" and row["BoN_teacher"] == "up"

        only_flaky = synthesizer(db, [flaky], FakeChatModel(replies=["f"]))
        out2 = tmp_path / "out2.jsonl"
        report = asyncio.run(run_synth([dead_item], synthesizer=only_flaky, output=out2))
        assert report.written == 0 and report.failed[0][0] == dead_item.id
        assert "every teacher failed" in report.failed[0][1]
        assert not out2.exists() or out2.read_text() == ""
        state["down"] = False
        report = asyncio.run(run_synth([dead_item], synthesizer=only_flaky, output=out2))
        assert report.written == 1 and json.loads(out2.read_text())["flaky"] == "fine"


def test_an_id_reused_for_another_prompt_stops_the_job(tmp_path: Path) -> None:
    teacher = handle(FakeChatModel(replies=["a"]), name="t")
    with CandidateStore(tmp_path / "s.sqlite") as db:
        first = synthesizer(db, [teacher], FakeChatModel())
        asyncio.run(run_synth([item("one", id="x")], synthesizer=first, output=tmp_path / "1"))
        second = synthesizer(db, [teacher], FakeChatModel())
        with pytest.raises(StoreConflictError, match="prompt id 'x'"):
            asyncio.run(run_synth([item("two", id="x")], synthesizer=second, output=tmp_path / "2"))


def test_prepare_output_cuts_a_half_written_row(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = json.dumps({"id": "a", "teachers": ["t"]}) + "\n"
    out.write_text(good + '{"id": "b", "teach')
    assert prepare_output(out, ["t"]) == {"a"}
    assert out.read_text() == good
    with pytest.raises(OutputMismatchError, match="teachers"):
        prepare_output(out, ["t", "u"])
    out.write_text("not json\n")
    with pytest.raises(ValueError, match=r"out\.jsonl:1 is not a synth row"):
        prepare_output(out, ["t"])


def test_resume_skips_done_rows_and_never_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    items = [item(f"question {i}") for i in range(6)]
    recorder = CallRecorder()
    teacher = handle(FakeChatModel(replies=["answer"], recorder=recorder), name="t")
    with CandidateStore(tmp_path / "s.sqlite") as db:
        asyncio.run(
            run_synth(
                items[:2], synthesizer=synthesizer(db, [teacher], FakeChatModel()), output=out
            )
        )
        before = out.read_text()
        with out.open("a") as handle_:  # a run killed in the middle of a row
            handle_.write('{"id": "' + items[2].id + '", "prompt": "quest')
        report = asyncio.run(
            run_synth(items, synthesizer=synthesizer(db, [teacher], FakeChatModel()), output=out)
        )
    text = out.read_text()
    assert text.startswith(before)  # rows already written are untouched
    ids = [json.loads(line)["id"] for line in text.splitlines()]
    assert sorted(ids) == sorted(i.id for i in items) and len(ids) == len(set(ids))
    assert (report.already_done, report.written, report.total) == (2, 4, 6)
    assert len(recorder.calls) == 6  # each prompt's candidate generated once


# --- metrics ----------------------------------------------------------------------------------


def test_normalize_and_matching() -> None:
    assert normalize("The  Eiffel-Tower!") == "eiffel tower"
    assert normalize("1,000 apples") == "1000 apples"
    assert exact_match("Paris.", ["paris"]) and not exact_match("Paris, France", ["Paris"])
    assert exact_match("Reasoning...\n#### 42", ["42"])
    assert contains_answer("The capital is Paris, of course.", ["Paris"])
    assert not contains_answer("It is 123.", ["12"])  # whole words only
    assert contains_answer("2 + 2 = four", ["4", "four"])
    assert not contains_answer("anything", [])
    # "The answer is:" then a line break: the whole reply is scored, not an empty part.
    assert contains_answer("The answer is:\nThe capital of France is Paris.", ["Paris"])
    assert not exact_match("", [""])


def test_extractors_are_pluggable() -> None:
    assert get_extractor("number")("I think 3, no, 41 apples") == "41"
    assert get_extractor("last-line")("working\n\nParis\n") == "Paris"
    assert get_extractor("first-line")("\nLyon\nParis") == "Lyon"
    assert get_extractor("text")("as is") == "as is"
    assert get_extractor("json:dumps") is json.dumps
    for bad in ("nope", "json:missing", "no_such_module_xyz:f"):
        with pytest.raises(ValueError, match="extractor"):
            get_extractor(bad)
    assert exact_match("blah 41", ["41"], extract=get_extractor("number"))


@pytest.mark.parametrize(
    ("forward", "backward", "outcome"),
    [
        ("A", "B", "win"),  # preferred in both orders
        ("B", "A", "loss"),
        ("A", "A", "tie"),  # position bias: always the first shown
        ("B", "B", "tie"),
        ("A", None, "win"),  # one valid vote
        (None, "A", "loss"),
        ("tie", "tie", "tie"),
        (None, None, "tie"),
    ],
)
def test_combine_verdicts(forward: str | None, backward: str | None, outcome: str) -> None:
    assert combine_verdicts(forward, backward) == outcome


def test_win_rate_counts_ties_as_half() -> None:
    assert win_rate(3, 2, 5) == pytest.approx(0.4)
    assert win_rate(0, 4, 0) == 0.5
    assert win_rate(0, 0, 0) is None


def test_judge_pair_asks_both_orders_and_skips_identical_answers() -> None:
    recorder = CallRecorder()
    judge = FakeChatModel(replies=pairwise_judge, recorder=recorder)
    conv = [HumanMessage("Capital of France?")]
    won = asyncio.run(judge_pair(judge, conv, "Paris", "Lyon"))
    assert (won.outcome, won.judged, won.verdicts) == ("win", True, ("A", "B"))
    lost = asyncio.run(judge_pair(judge, conv, "Lyon", "It is Paris"))
    assert lost.outcome == "loss" and len(recorder.calls) == 4
    same = asyncio.run(judge_pair(judge, conv, "Paris.", "paris"))
    assert (same.outcome, same.judged) == ("tie", False) and len(recorder.calls) == 4
    assert asyncio.run(judge_pair(judge, conv, None, "x")).outcome == "loss"
    assert asyncio.run(judge_pair(judge, conv, "x", None)).outcome == "win"
    biased = FakeChatModel(replies=['{"winner": "A"}'])
    assert asyncio.run(judge_pair(biased, conv, "Paris", "Lyon")).outcome == "tie"


# --- evaluation ---------------------------------------------------------------------------------

GEN = {0: "It is Lyon.", 1: "Paris", 2: "Paris!", 3: "Marseille"}


def evaluator(
    db: CandidateStore, recorder: CallRecorder, gen: CallRecorder | None = None, **kwargs: Any
) -> Evaluator:
    stats = JobStats()
    generator = FakeChatModel(replies=lambda c: GEN[c.kwargs["seed"]], recorder=gen or recorder)
    judge = RecordedModel(
        handle(FakeChatModel(replies=pointwise_or_pairwise, recorder=recorder), name="judge"),
        db,
        stats,
        role="judge",
    )
    fusor = RecordedModel(
        handle(FakeChatModel(replies=["The answer is Paris."], recorder=recorder), name="fusor"),
        db,
        stats,
        role="fusor",
    )
    names = ["single", "bon-judge", "bon-pairwise", "majority-vote", "fusion"]
    return Evaluator(
        pool=Pool([handle(generator, name="gen")], db, stats),
        strategies=default_strategies(names, judge=judge, fusor=fusor),
        ns=[1, 2, 4],
        judge=judge,
        **kwargs,
    )


def test_eval_scores_every_strategy_on_the_same_candidates(tmp_path: Path) -> None:
    recorder, gen = CallRecorder(), CallRecorder()
    items = [item("Capital of France?", id="fr", refs=("Paris",))]
    with CandidateStore(tmp_path / "s.sqlite") as db:
        report = asyncio.run(run_eval(items, evaluator=evaluator(db, recorder, gen)))
        table = {(s.strategy, s.n): s for s in report.scores}
        assert report.failed == []
        assert len(gen.calls) == 4  # max(N) candidates, shared by every strategy and N
        assert table["single", 1].contains == 0.0 and table["single", 1].win_rate is None
        assert table["bon-judge", 1].contains == 0.0  # N=1: candidate 0, no judge call
        for name in ("bon-judge", "bon-pairwise", "fusion"):
            assert table[name, 2].contains == 1.0, name
        for name in ("bon-judge", "bon-pairwise", "majority-vote", "fusion"):
            assert table[name, 4].contains == 1.0, name
            assert (table[name, 4].wins, table[name, 4].win_rate) == (1, 1.0), name
        # N=2: "it is lyon" and "paris" tie 1-1, the first seen wins: the same as single.
        assert table["majority-vote", 2].contains == 0.0
        assert (table["majority-vote", 2].ties, table["majority-vote", 2].judged) == (1, 0)
        assert table["majority-vote", 4].exact == 1.0  # "paris" has 2 of 4 votes
        # The fusor says "The answer is Paris.": the default extractor takes "Paris".
        assert table["fusion", 1].contains == 1.0 and table["fusion", 1].exact == 1.0
        assert table["oracle", 1].contains == 0.0 and table["oracle", 2].contains == 1.0
        answers = report.items[0].answers
        bon = next(a for a in answers if a.strategy == "bon-judge" and a.n == 4)
        assert bon.selected_index == 1 and bon.method == "llm_judge:judge" and not bon.fallback
        assert [c.text for c in report.items[0].candidates] == list(GEN.values())

        calls = len(recorder.calls)
        again = asyncio.run(run_eval(items, evaluator=evaluator(db, recorder, gen)))
        assert len(recorder.calls) == calls and len(gen.calls) == 4  # no model call at all
        assert [s.model_dump() for s in again.scores] == [s.model_dump() for s in report.scores]


def test_eval_baseline_other_than_single_compares_at_the_same_n(tmp_path: Path) -> None:
    items = [item("Capital of France?", id="fr", refs=("Paris",))]
    with CandidateStore(tmp_path / "s.sqlite") as db:
        report = asyncio.run(
            run_eval(items, evaluator=evaluator(db, CallRecorder(), baseline="majority-vote"))
        )
    table = {(s.strategy, s.n): s for s in report.scores}
    assert table["majority-vote", 4].win_rate is None  # the baseline itself
    assert table["single", 1].ties == 1  # single = vote@1 = candidate 0: identical, a tie
    assert table["fusion", 1].wins == 1  # "The answer is Paris." beats vote@1 = Lyon
    assert table["bon-judge", 2].wins == 1  # Paris beats vote@2 = Lyon


def test_write_results_and_plot(tmp_path: Path) -> None:
    with CandidateStore(tmp_path / "s.sqlite") as db:
        report = asyncio.run(
            run_eval(
                [item("Capital of France?", id="fr", refs=("Paris",))],
                evaluator=evaluator(db, CallRecorder()),
            )
        )
    paths = write_results(report, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert {"config", "scores", "failed_items", "stats"} <= set(data)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == len(report.scores) and rows[0]["strategy"] == "single"
    assert "| fusion | 4 |" in paths["markdown"].read_text()
    assert json.loads(paths["answers"].read_text().splitlines()[0])["id"] == "fr"
    png = plot_scores(report.scores, tmp_path / "out" / "plot.png", baseline="single")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- both commands against a fake OpenAI-compatible server ---------------------------------------


def test_synth_command_end_to_end_and_replay(jobs_server: FakeOpenAI, tmp_path: Path) -> None:
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": f"q{i}", "prompt": f"Question {i}?", "language_code": "en"} for i in range(3)],
    )
    out, store = tmp_path / "out.jsonl", tmp_path / "store.sqlite"
    args = [
        "synth", str(prompts), "-o", str(out), "--store", str(store),
        "-t", f"openai:{jobs_server.url}:alpha",
        "-t", f"vllm:{jobs_server.url}:beta:seed=1,name=B",
        "-t", f"openai:{jobs_server.url}:broken",
        "--fusor", f"openai:{jobs_server.url}:fusor", "--selector", "vote",
        "--retries", "0", "--concurrency", "2",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["q0", "q1", "q2"]
    row = next(r for r in rows if r["id"] == "q0")
    assert row["alpha"] == "alpha answer Lyon 0" and row["B"] == "beta answer Paris 1"
    assert row["broken"] is None and "500" in row["failed_teachers"]["broken"]
    assert row["BoN_selector"] == "majority_vote" and row["Fusion"] == "The answer is Paris."
    assert row["language_code"] == "en"
    assert "rows written" in result.stderr and "teacher failures" in result.stderr
    assert jobs_server.requests["alpha"] == 3 and jobs_server.requests["fusor"] == 3
    first_text = out.read_text()

    before, broken = sum(jobs_server.requests.values()), jobs_server.requests["broken"]
    again = runner.invoke(app, [*args[:3], str(tmp_path / "replay.jsonl"), *args[4:]])
    assert again.exit_code == 0, again.output
    # Only the broken teacher (a failure is never stored) is asked again.
    assert jobs_server.requests["broken"] > broken
    assert sum(jobs_server.requests.values()) - before == jobs_server.requests["broken"] - broken
    replay = [json.loads(line) for line in (tmp_path / "replay.jsonl").read_text().splitlines()]
    key = lambda r: (r["id"], r["alpha"], r["B"], r["BoN"], r["Fusion"])  # noqa: E731
    assert sorted(map(key, replay)) == sorted(map(key, rows))

    resumed = runner.invoke(app, args)  # everything done: nothing redone
    assert resumed.exit_code == 0 and out.read_text() == first_text
    assert re.search(r"already done\s*│\s*3", resumed.stderr)


def test_synth_command_reports_prompts_whose_teachers_all_failed(
    jobs_server: FakeOpenAI, tmp_path: Path
) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?"}])
    out = tmp_path / "o.jsonl"
    result = runner.invoke(
        app,
        [
            "synth", str(prompts), "-o", str(out), "-t", f"openai:{jobs_server.url}:broken",
            "--fusor", f"openai:{jobs_server.url}:fusor", "--selector", "vote", "--retries", "0",
        ],
    )  # fmt: skip
    assert result.exit_code == 1
    text = " ".join(result.stderr.split())
    assert "1 prompt(s) have no row" in text and "every teacher failed" in text
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "gpt4"], "must start with local"),
        (["-t", "local", "-t", "local"], "same model with the same sampling settings"),
        (["-t", "local:name=prompt"], "reserved column name"),
        (["--shard", "5/2"], "--shard I/K needs"),
    ],
)
def test_synth_command_bad_options_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?"}])
    result = runner.invoke(app, ["synth", str(prompts), "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())


def test_synth_command_missing_file_and_mismatched_output(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", str(tmp_path / "nope.jsonl"), "-o", "x"])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.stderr.split())
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?"}])
    out = write_jsonl(tmp_path / "o.jsonl", [{"id": "z", "teachers": ["other"]}])
    result = runner.invoke(app, ["synth", str(prompts), "-o", str(out)])
    assert result.exit_code == 2 and "write to a new output file" in " ".join(result.stderr.split())


def test_eval_command_end_to_end_with_a_vllm_pool_and_replay(
    jobs_server: FakeOpenAI, tmp_path: Path
) -> None:
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"id": "fr", "prompt": "Capital of France?", "reference": "Paris"},
         {"id": "open", "prompt": "Tell me a story."}],
    )  # fmt: skip
    out = tmp_path / "res"
    args = [
        "eval", str(data), "-m", f"vllm:{jobs_server.url}:gen", "--n", "4,1,2",
        "--judge", f"openai:{jobs_server.url}:judge", "--fusor", f"openai:{jobs_server.url}:fusor",
        "--out", str(out), "--retries", "0",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    generation = [b for b in jobs_server.bodies if b["model"] == "gen"]
    assert [b["n"] for b in generation] == [4, 4]  # one request per prompt, n = max(N)
    assert "strategy" in result.stdout and "oracle" in result.stdout
    data_out = json.loads((out / "eval.json").read_text())
    table = {(s["strategy"], s["n"]): s for s in data_out["scores"]}
    assert table["single", 1]["contains"] == 0.0  # seed 0: Lyon
    assert table["fusion", 4]["contains"] == 1.0
    assert table["fusion", 4]["items"] == 2 and table["fusion", 4]["with_reference"] == 1
    assert data_out["config"]["n"] == [1, 2, 4] and data_out["config"]["models"] == ["gen"]
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "eval.csv").exists() and (out / "answers.jsonl").exists()

    before = sum(jobs_server.requests.values())
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert sum(jobs_server.requests.values()) == before  # every call replayed from the store
    assert json.loads((out / "eval.json").read_text())["scores"] == data_out["scores"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "0,2"], "--n values must be between 1 and 64"),
        (["--n", "a"], "comma-separated list"),
        (["--strategies", "best"], "unknown strategy best"),
        (["--baseline", "oracle"], "--baseline must be one of"),
        (["--extractor", "nope"], "unknown extractor"),
    ],
)
def test_eval_command_bad_options_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["eval", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())


def test_help_lists_the_spec_grammar() -> None:
    text = " ".join(runner.invoke(app, ["synth", "--help"]).stdout.split())
    assert "openai:URL:MODEL" in text and "resume" in text
    text = " ".join(runner.invoke(app, ["eval", "--help"]).stdout.split())
    assert "majority-vote" in text and "builtin" in text


def test_an_empty_prompt_file_is_refused_with_a_sentence(tmp_path: Path) -> None:
    from fusion_graph.cli import app

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = runner.invoke(app, ["synth", str(empty), "-o", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 2
    assert "holds no prompts" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
