"""The benchmark entry point still runs (tiny sizes). It checks the report, not a speed."""

from __future__ import annotations

from pathlib import Path

from benchmarks import durable, openai_backend, spend
from benchmarks.__main__ import main


def test_benchmarks_quick_run_writes_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    assert main(["--quick", "--no-local", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## 1. Overhead vs the ideal" in text
    for strategy in ("fusion", "bon:reward", "bon:judge", "fusion+critic"):
        assert f"| 4 | {strategy} | async |" in text
    assert "| 4 | fusion | sync |" in text
    assert "## 2. Orchestration CPU and memory" in text
    assert "## 3. Tracing cost" in text
    assert "## 5. Durable fan-out" in text
    assert "| 2 | async |" in text
    assert (tmp_path / "overhead.png").stat().st_size > 1000


def test_durable_benchmark_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "durable.md"
    argv = ["--sizes", "2", "--repeats", "1", "--latency", "0.01", "--out", str(out)]
    assert durable.main(argv) == 0
    text = out.read_text()
    assert "| N | path | durable ms | no ckpt ms | floor ms | Send ms | Send, mc=N ms |" in text
    for path in ("sync", "async"):
        assert f"| 2 | {path} |" in text
    assert "Command: `python -m benchmarks.durable --sizes 2" in text


def test_spend_benchmark_writes_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "spend.md"
    argv = ["--runs", "4", "--sync-runs", "2", "--median", "0.01", "--out", str(out)]
    assert spend.main(argv) == 0
    text = out.read_text()
    assert "| path | arm | runs | p50 ms | p90 ms | p99 ms |" in text
    for path in ("async", "sync"):
        for arm in ("without", "k=4, g=0.1 s", "k=6, g=0.1 s", "k=4, g=0.3 s"):
            assert f"| {path} | {arm} | " in text
    assert "Command: `python -m benchmarks.spend --runs 4" in text
    result = spend.measure(3, 2, arms=[spend.Arm(), spend.Arm(2, 0.0)], median=0.01)
    rows = result["rows"]
    assert [(r["path"], r["arm"]) for r in rows] == [
        ("async", "without"),
        ("async", "k=2, g=0 s"),
        ("sync", "without"),
        ("sync", "k=2, g=0 s"),
    ]
    for r in rows:
        assert r["kept"] + r["cancelled"] == 8
        assert r["cut_but_kept"] == 0
        assert r["fusor_saw_kept"] == r["runs"]
    assert all(r["cancelled"] == 0 for r in rows if r["arm"] == "without")


def test_openai_backend_benchmark_writes_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "openai_backend.md"
    argv = ["--sizes", "2", "--repeats", "1", "--latency", "0.01", "--no-request-cpu"]
    assert openai_backend.main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    assert "| server | strategy | N | path | wall (ms) | ÷ ideal | floor ÷ ideal |" in text
    for server in ("n honoured", "n ignored"):
        for strategy in openai_backend.STRATEGIES:
            for path in ("async", "sync"):
                assert f"| {server} | {strategy} | 2 | {path} |" in text
    assert "| async ÷ sync |" in text
    assert "Command: `python -m benchmarks.openai_backend --sizes 2" in text
    cpu = openai_backend.request_cpu(concurrent=4, rounds=1)
    assert set(cpu) == {
        "raw httpx (async)",
        "ainvoke",
        "ainvoke, response_format bound",
        "invoke (threads)",
    }
