"""The benchmark entry point still runs (tiny sizes). It checks the report, not a speed."""

from __future__ import annotations

from pathlib import Path

from benchmarks import durable
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
