"""`synth` and `eval` end to end on the real embedded model (tiny sizes): rows, replay with
no model call, resume after a SIGKILL, and an evaluation with its files."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fusion_graph.cli import app

pytestmark = pytest.mark.integration

runner = CliRunner()
MODEL = "SmolLM2-135M-Instruct"
TOKENS = ["--max-tokens", "16"]


def _prompts(path: Path, texts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_synth_end_to_end_then_replay_with_every_model_unreachable(tmp_path: Path) -> None:
    prompts = _prompts(tmp_path / "p.jsonl", ["Name a primary colour.", "What is 2 + 2?"])
    out, store = tmp_path / "out.jsonl", tmp_path / "store.sqlite"
    common = ["--store", str(store), *TOKENS, "--selector", "judge"]
    result = runner.invoke(
        app,
        [
            "synth", str(prompts), "-o", str(out), *common,
            "-t", "local", "-t", "local:temperature=0.9,name=hot",
            "--judge", "local:max_tokens=8",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert sorted(r["id"] for r in rows) == ["p0", "p1"]
    for row in rows:
        assert row["teachers"] == [MODEL, "hot"] and row["failed_teachers"] == {}
        assert isinstance(row[MODEL], str) and isinstance(row["hot"], str)
        assert row["BoN"] in (row[MODEL], row["hot"])
        assert str(row["BoN_selector"]).endswith("majority_vote") or str(
            row["BoN_selector"]
        ).startswith("llm_judge:")
        assert isinstance(row["Fusion"], str) and str(row["Fusion"]).strip()
        assert row["fusor"] == MODEL and len(str(row["input_hash"])) == 64
    assert re.search(r"candidates\s*│\s*4 generated", result.stderr)

    # Replay: the same teachers, judge and fusor (same model names and sampling settings),
    # but every one of them behind a closed port. Any call would fail and show in the rows.
    dead = f"openai:http://127.0.0.1:{_closed_port()}/v1:{MODEL}"
    replay = tmp_path / "replay.jsonl"
    again = runner.invoke(
        app,
        [
            "synth", str(prompts), "-o", str(replay), *common, "--retries", "0",
            "-t", dead, "-t", f"{dead}:temperature=0.9,name=hot",
            "--judge", f"{dead}:max_tokens=8", "--fusor", f"{dead}:temperature=0.2",
        ],
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert re.search(r"model requests\s*│\s*0\s", again.stderr), again.stderr
    assert re.search(r"candidates\s*│\s*0 generated, 4 replayed", again.stderr)
    fields = (MODEL, "hot", "BoN", "BoN_teacher", "Fusion", "Fusion_fallback", "failed_teachers")
    by_id = {r["id"]: r for r in rows}
    for row in _rows(replay):
        assert {f: row[f] for f in fields} == {f: by_id[row["id"]][f] for f in fields}
        assert all(c["replayed"] for c in row["candidates"])  # type: ignore[attr-defined]


def test_synth_resumes_after_sigkill_without_losing_or_duplicating_rows(tmp_path: Path) -> None:
    words = ["cat", "dog", "sun", "tree", "red"]
    texts = [f"Give one word that rhymes with {w}." for w in words]
    prompts = _prompts(tmp_path / "p.jsonl", texts)
    out = tmp_path / "out.jsonl"
    args = [
        sys.executable, "-c", "from fusion_graph.cli import main; main()", "synth", str(prompts),
        "-o", str(out), "-t", "local", "--selector", "vote", "--concurrency", "1", *TOKENS,
    ]  # fmt: skip
    log = tmp_path / "first-run.log"
    with log.open("wb") as errors:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=errors)
        deadline = time.monotonic() + 240
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if out.exists() and out.read_bytes().count(b"\n") >= 1:
                    break
                time.sleep(0.05)
            running = proc.poll() is None
            if running:
                os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
    assert running, f"synth ended before it could be killed: {log.read_text()}"
    assert proc.returncode == -signal.SIGKILL
    before = out.read_bytes()
    complete = before[: before.rfind(b"\n") + 1]
    done_before = [json.loads(line)["id"] for line in complete.decode().splitlines()]
    assert 1 <= len(done_before) < len(texts), "the kill must land mid-run"

    result = runner.invoke(app, args[3:])
    assert result.exit_code == 0, result.output
    after = out.read_bytes()
    assert after.startswith(complete)  # rows written before the kill are untouched
    ids = [r["id"] for r in _rows(out)]
    assert sorted(ids) == sorted(f"p{i}" for i in range(len(texts)))  # none lost
    assert len(ids) == len(set(ids))  # none duplicated
    assert re.search(rf"already done\s*│\s*{len(done_before)}\s", result.stderr)
    assert re.search(rf"rows written\s*│\s*{len(texts) - len(done_before)}\s", result.stderr)


def test_eval_end_to_end_on_the_builtin_set_then_replay(tmp_path: Path) -> None:
    out = tmp_path / "res"
    args = [
        "eval", "--limit", "2", "--n", "1,2", *TOKENS, "--out", str(out),
        "--strategies", "single,bon-judge,majority-vote,fusion",
        "--judge", "local:max_tokens=8", "--title", "test run",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "eval.json").read_text())
    table = {(s["strategy"], s["n"]): s for s in data["scores"]}
    # With a vote and FusioN, the vote at FusioN's token budget is a row too (no win-rate).
    budget = "majority-vote@fusion-budget"
    expected = {("single", 1)} | {
        (s, n) for s in ("bon-judge", "majority-vote", "fusion", "oracle", budget) for n in (1, 2)
    }
    assert set(table) == expected
    for (name, _), score in table.items():
        assert score["items"] == 2 and score["with_reference"] == 2
        assert 0.0 <= score["contains"] <= 1.0 and 0.0 <= score["exact"] <= score["contains"]
        if name not in ("single", "oracle", budget):
            assert score["wins"] + score["ties"] + score["losses"] == 2
            assert 0.0 <= score["win_rate"] <= 1.0
    assert table["oracle", 2]["contains"] >= table["single", 1]["contains"]
    assert data["stats"]["candidates_generated"] == 4 and data["failed_items"] == []
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2
    assert "fusion" in result.stdout and "win-rate" in result.stdout

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    replayed = json.loads((out / "eval.json").read_text())
    assert replayed["stats"]["requests"] == 0
    assert replayed["stats"]["candidates_replayed"] == 4
    assert replayed["scores"] == data["scores"]
    assert _flat(again.stderr).count("model requests │ 0") == 1
