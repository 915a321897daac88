"""``synth`` and ``eval`` on a real Ray cluster (head + worker node on loopback) against a
fake OpenAI-compatible server that counts requests: the rows equal the single-machine
job's, every (prompt, teacher) is asked once, the endpoint's limit holds cluster-wide, a
failing teacher is data, and a SIGKILLed worker or driver loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fusion_graph.batch import CandidateStore, Defaults, JobModels, Synthesizer, run_synth
from fusion_graph.batch.data import PromptItem, read_prompts
from fusion_graph.batch.evaluate import Evaluator, run_eval
from fusion_graph.batch.ray import EvalJob, SynthJob, eval_on_ray, synth_on_ray
from fusion_graph.models import ModelSpec
from tests.faults.fake_openai import FakeOpenAI, Fault
from tests.ray.conftest import ENV, Cluster

pytestmark = pytest.mark.ray

TEACHERS = 3
VOLATILE = {"seconds"}
"""Row fields that are timings (not compared)."""


def _items(path: Path, count: int) -> list[PromptItem]:
    rows = [{"id": f"p{i}", "prompt": f"Question {i}?"} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return read_prompts(path).items


def _specs(fake: FakeOpenAI, options: str = "") -> list[ModelSpec]:
    extra = f",{options}" if options else ""
    return [
        ModelSpec.parse(f"openai:{fake.base_url}:fake:name=t{i},temperature=0.{i + 1}{extra}")
        for i in range(TEACHERS)
    ]


DEFAULTS = Defaults(temperature=0.3, max_tokens=32, retries=0)


def _job(fake: FakeOpenAI, options: str = "") -> SynthJob:
    return SynthJob(teachers=_specs(fake, options), defaults=DEFAULTS, selector="vote")


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in VOLATILE}
    out["candidates"] = [{k: v for k, v in c.items() if k != "seconds"} for c in row["candidates"]]
    return out


def _candidate_requests(fake: FakeOpenAI, items: list[PromptItem]) -> Counter[tuple[str, int]]:
    """(prompt, seed) of every teacher request (the fusor's prompt holds the candidates)."""
    prompts = {it.prompt for it in items}
    return Counter((r.prompt, r.seed) for r in fake.requests if r.prompt in prompts)


def _single_machine(job: SynthJob, items: list[PromptItem], out: Path, store: Path) -> None:
    with CandidateStore(store) as db:
        models = JobModels(job.teachers, job.defaults, db)
        synthesizer = Synthesizer.of(models, selector=job.selector)
        asyncio.run(run_synth(items, synthesizer=synthesizer, output=out, concurrency=4))


def test_rows_equal_the_single_machine_rows_and_each_teacher_is_asked_once(
    ray_cluster: Cluster, fake: FakeOpenAI, tmp_path: Path
) -> None:
    items = _items(tmp_path / "p.jsonl", 16)
    job = _job(fake)
    local_out = tmp_path / "local.jsonl"
    _single_machine(job, items, local_out, tmp_path / "local.sqlite")
    fake.configure()

    out = tmp_path / "ray.jsonl"
    report = synth_on_ray(
        items, job, output=out, store=tmp_path / "ray.sqlite", address=ray_cluster.address,
        workers=2, concurrency=4,
    )  # fmt: skip

    assert report.written == 16 and not report.failed and report.already_done == 0
    ray_rows = sorted(_rows(out), key=lambda r: r["id"])
    local_rows = sorted(_rows(local_out), key=lambda r: r["id"])
    assert [r["id"] for r in ray_rows] == sorted(it.id for it in items)
    assert [_comparable(r) for r in ray_rows] == [_comparable(r) for r in local_rows]
    asked = _candidate_requests(fake, items)
    assert len(asked) == 16 * TEACHERS and set(asked.values()) == {1}
    assert report.stats.generated == 16 * TEACHERS and report.stats.replayed == 0

    # A rerun has nothing to do: every row is there, and nothing is asked.
    fake.configure()
    again = synth_on_ray(
        items, job, output=out, store=tmp_path / "ray.sqlite", address=ray_cluster.address
    )
    assert again.already_done == 16 and again.written == 0 and fake.received == 0
    assert len(_rows(out)) == 16


def test_the_endpoint_limit_holds_across_the_cluster(
    ray_cluster: Cluster, fake: FakeOpenAI, tmp_path: Path
) -> None:
    # Two workers, four prompts each in flight, three teachers: 24 requests could be in
    # flight; each process alone would allow 2. The cluster as a whole allows 2.
    fake.configure(rules=[(lambda r: True, Fault.slow_first_byte(0.2))])
    items = _items(tmp_path / "p.jsonl", 8)
    report = synth_on_ray(
        items, _job(fake, "concurrency=2"), output=tmp_path / "out.jsonl",
        store=tmp_path / "store.sqlite", address=ray_cluster.address, workers=2, concurrency=4,
    )  # fmt: skip
    assert report.written == 8
    assert fake.peak_in_flight == 2


def test_a_failing_teacher_is_data_in_the_rows(
    ray_cluster: Cluster, fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.configure(rules=[(lambda r: r.seed == 1 and r.prompt.startswith("Question"),
                           Fault.status(500))])  # fmt: skip
    items = _items(tmp_path / "p.jsonl", 6)
    out = tmp_path / "out.jsonl"
    report = synth_on_ray(
        items, _job(fake), output=out, store=tmp_path / "store.sqlite",
        address=ray_cluster.address, workers=2,
    )  # fmt: skip
    assert report.written == 6 and not report.failed
    assert report.teacher_failures == Counter({"t1": 6})
    for row in _rows(out):
        assert row["t1"] is None and set(row["failed_teachers"]) == {"t1"}
        assert row["t0"] and row["t2"] and row["BoN_teacher"] in ("t0", "t2")


def test_eval_on_ray_equals_the_single_machine_eval_and_replays_its_candidates(
    ray_cluster: Cluster, fake: FakeOpenAI, tmp_path: Path
) -> None:
    items = _items(tmp_path / "p.jsonl", 6)
    specs = [ModelSpec.parse(f"openai:{fake.base_url}:fake")]
    job = EvalJob(models=specs, defaults=DEFAULTS, ns=[1, 2, 4], win_rate=False)
    with CandidateStore(tmp_path / "local.sqlite") as db:
        evaluator = Evaluator.of(
            JobModels(specs, DEFAULTS, db), ns=job.ns, win_rate=False, strategies=job.strategies
        )
        local = asyncio.run(run_eval(items, evaluator=evaluator))
    fake.configure()

    store = tmp_path / "ray.sqlite"
    first = eval_on_ray(items, job, store=store, address=ray_cluster.address, workers=2)
    assert not first.failed and fake.received > 0
    asked = _candidate_requests(fake, items)
    assert len(asked) == 6 * 4 and set(asked.values()) == {1}  # each of the 4 samples once

    def table(report: Any) -> list[Any]:
        return [s.model_dump() if hasattr(s, "model_dump") else s for s in report.scores]

    assert table(first) == table(local)
    assert [i.model_dump() for i in first.items] == [i.model_dump() for i in local.items]

    # The replay guarantee: the same store, no model call, the same answers.
    fake.configure()
    second = eval_on_ray(items, job, store=store, address=ray_cluster.address, workers=2)
    assert fake.received == 0
    assert [[a.text for a in i.answers] for i in second.items] == [
        [a.text for a in i.answers] for i in first.items
    ]
    assert all(c.replayed for i in second.items for c in i.candidates)


def test_a_worker_killed_mid_job_loses_and_duplicates_no_row(
    ray_cluster: Cluster, fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.configure(rules=[(lambda r: True, Fault.slow_first_byte(0.15))])
    items = _items(tmp_path / "p.jsonl", 24)
    out = tmp_path / "out.jsonl"
    killed: list[int] = []

    def on_event(kind: str, item: Any, report: Any) -> None:
        if kind == "row" and report.written == 4 and not killed:
            workers = ray_cluster.workers("ray::MapWorker")
            assert workers, "no worker process found"
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])

    report = synth_on_ray(
        items, _job(fake), output=out, store=tmp_path / "store.sqlite",
        address=ray_cluster.address, workers=2, concurrency=2, on_event=on_event,
    )  # fmt: skip
    assert killed
    ids = [r["id"] for r in _rows(out)]
    assert sorted(ids) == sorted(it.id for it in items) and len(ids) == len(set(ids))
    assert report.written == 24 and not report.failed


DRIVER = """
import json, sys
from pathlib import Path
from fusion_graph.batch import Defaults
from fusion_graph.batch.data import read_prompts
from fusion_graph.batch.ray import SynthJob, synth_on_ray
from fusion_graph.models import ModelSpec
url, address, tmp = sys.argv[1], sys.argv[2], Path(sys.argv[3])
specs = [ModelSpec.parse(f"openai:{url}:fake:name=t{i},temperature=0.{i + 1}") for i in range(3)]
job = SynthJob(teachers=specs, defaults=Defaults(temperature=0.3, max_tokens=32, retries=0),
               selector="vote")
report = synth_on_ray(read_prompts(tmp / "p.jsonl").items, job, output=tmp / "out.jsonl",
                      store=tmp / "store.sqlite", address=address, workers=2, concurrency=2)
print(json.dumps({"written": report.written, "already_done": report.already_done}))
"""


def test_a_driver_killed_mid_job_then_rerun_writes_every_row_once(
    ray_cluster: Cluster, fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.configure(rules=[(lambda r: True, Fault.slow_first_byte(0.15))])
    items = _items(tmp_path / "p.jsonl", 24)
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-c", DRIVER, fake.base_url, ray_cluster.address, str(tmp_path)]
    driver = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out.exists() and len(out.read_text().splitlines()) >= 4):
        assert driver.poll() is None, "the driver ended before it was killed"
        assert time.monotonic() < deadline, "no rows written"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    before = _rows(out)
    assert 4 <= len(before) < 24

    rerun = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    rows = _rows(out)
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(it.id for it in items) and len(ids) == len(set(ids))
    assert rows[: len(before)] == before  # the rows written before the kill are kept as is
    assert result["already_done"] >= len(before)
    assert result["written"] + result["already_done"] == 24


def test_the_commands_with_ray_write_what_they_write_without(
    ray_cluster: Cluster, fake: FakeOpenAI, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from fusion_graph.cli import app

    _items(tmp_path / "p.jsonl", 6)
    teachers = [a for spec in _specs(fake) for a in ("-t", spec.text)]
    common = ["--selector", "vote", "--max-tokens", "32", "--retries", "0"]

    def synth(out: str, *extra: str) -> list[dict[str, Any]]:
        args = ["synth", str(tmp_path / "p.jsonl"), "-o", str(tmp_path / out), *teachers]
        result = CliRunner().invoke(app, [*args, *common, *extra])
        assert result.exit_code == 0, result.output
        return sorted(_rows(tmp_path / out), key=lambda r: r["id"])

    local = synth("local.jsonl")
    on_ray = synth("ray.jsonl", "--ray", "--ray-address", ray_cluster.address)
    assert [_comparable(r) for r in on_ray] == [_comparable(r) for r in local]

    def evaluate(out: str, *extra: str) -> dict[str, Any]:
        args = ["eval", str(tmp_path / "p.jsonl"), "-m", _specs(fake)[0].text, "--n", "1,2"]
        more = ["--strategies", "majority-vote,fusion", "--no-win-rate", "--retries", "0"]
        result = CliRunner().invoke(app, [*args, *more, "--out", str(tmp_path / out), *extra])
        assert result.exit_code == 0, result.output
        payload: dict[str, Any] = json.loads((tmp_path / out / "eval.json").read_text())
        return payload

    plain = evaluate("eval-local")
    ray_eval = evaluate("eval-ray", "--ray", "--ray-address", ray_cluster.address)
    assert ray_eval["scores"] == plain["scores"]


def test_synth_on_ray_with_the_embedded_model(ray_cluster: Cluster, tmp_path: Path) -> None:
    """The README's command: every worker runs the embedded model."""
    from typer.testing import CliRunner

    from fusion_graph.cli import app

    _items(tmp_path / "p.jsonl", 3)
    out = tmp_path / "out.jsonl"
    teachers = ["-t", "local:temperature=0.3", "-t", "local:temperature=0.7"]
    args = ["synth", str(tmp_path / "p.jsonl"), "-o", str(out), *teachers]
    more = ["--selector", "vote", "--max-tokens", "8", "--ray", "--ray-address"]
    result = CliRunner().invoke(app, [*args, *more, ray_cluster.address])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert sorted(r["id"] for r in rows) == ["p0", "p1", "p2"]
    for row in rows:
        assert len(row["teachers"]) == 2 and all(row[t] for t in row["teachers"])
        assert all(c["ok"] for c in row["candidates"]) and row["Fusion"]
