"""Run every benchmark, print the tables, write benchmarks/results.md and a plot.

python -m benchmarks            # the full run (a few minutes on 2 cores)
python -m benchmarks --quick    # tiny sizes: checks the benchmarks still run
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import durable, orchestration

HERE = Path(__file__).parent

TARGETS = {
    ("fusion", "async", 16): ("vs_floor", "<= 1.02 x asyncio.gather floor"),
    ("fusion", "async", 64): ("vs_floor", "<= 1.02 x asyncio.gather floor"),
    ("fusion", "sync", 16): ("vs_floor", "<= 1.05 x thread-pool floor"),
    ("fusion", "sync", 64): ("vs_floor", "<= 1.05 x thread-pool floor"),
}


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def overhead_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| N | strategy | path | wall (s) | ÷ ideal | floor ÷ ideal | ÷ floor "
        "| sequential ÷ ours | target |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        target = TARGETS.get((r["strategy"], r["path"], r["n"]))
        note = ""
        if target:
            ok = r["vs_floor"] <= float(target[1].split()[1])
            note = f"{target[1]}: {'met' if ok else 'missed'}"
        if r["strategy"] == "fusion" and r["path"] == "async" and r["n"] == 16:
            seq = r.get("sequential_vs_ours", 0)
            note += f"; >= 10x vs sequential: {'met' if seq >= 10 else 'missed'}"
        seq_cell = f"{r['sequential_vs_ours']:.1f}x" if "sequential_vs_ours" in r else ""
        lines.append(
            f"| {r['n']} | {r['strategy']} | {r['path']} | {r['wall_s']:.3f} | "
            f"{r['vs_ideal']:.3f} | {r['floor_vs_ideal']:.3f} | {r['vs_floor']:.3f} | "
            f"{seq_cell} | {note} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series = sorted({(r["strategy"], r["path"]) for r in rows})
    for strategy, run_path in series:
        points = [r for r in rows if r["strategy"] == strategy and r["path"] == run_path]
        ax.plot(
            [p["n"] for p in points],
            [p["vs_ideal"] for p in points],
            marker="o",
            label=f"{strategy} ({run_path})",
        )
    floors = [r for r in rows if r["strategy"] == "fusion" and r["path"] == "async"]
    ax.plot(
        [p["n"] for p in floors],
        [p["floor_vs_ideal"] for p in floors],
        "k--",
        label="asyncio.gather floor",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N candidates")
    ax.set_ylabel("wall time ÷ ideal")
    ax.set_title("fusion-graph orchestration overhead (simulated 100 ms model calls)")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", type=Path, default=HERE / "results.md", help="markdown output")
    parser.add_argument("--no-local", action="store_true", help="skip the embedded-model rows")
    args = parser.parse_args(argv)

    sizes = [1, 4] if args.quick else [1, 4, 16, 64]
    latency = 0.02 if args.quick else orchestration.LATENCY
    repeats = 1 if args.quick else 3
    started = time.perf_counter()
    sections = [
        "# Benchmark results",
        f"Machine: {_machine()}. "
        f"Command: `python -m benchmarks{' --quick' if args.quick else ''}`.",
    ]

    print("1/5 overhead vs ideal ...", file=sys.stderr)
    rows = orchestration.overhead(sizes, latency=latency, repeats=repeats)
    sections += [
        f"## 1. Overhead vs the ideal (model calls simulated at {latency * 1000:.0f} ms)",
        "Ideal = the critical path of model calls: one candidate call (+ one critique) + the "
        "decision call(s). Floor = the same calls written by hand (`asyncio.gather`, or a "
        "thread pool of N for the sync path).",
        overhead_table(rows),
    ]
    plot_path = args.out.with_name("overhead.png")
    plot(rows, plot_path)
    sections.append(f"![overhead]({plot_path.name})")

    print("2/5 CPU and memory ...", file=sys.stderr)
    cpu = orchestration.cpu_cost(n=16 if args.quick else 64, runs=3 if args.quick else 20)
    mem = orchestration.memory(sizes if args.quick else [4, 16, 64, 256])
    sections += [
        "## 2. Orchestration CPU and memory (zero-latency fake models)",
        f"FusioN, N={cpu['n']}: {cpu['cpu_s_per_candidate'] * 1e6:.0f} µs CPU per candidate "
        f"({cpu['candidates_per_cpu_s']:.0f} candidates per CPU-second), fusor call included.",
        "| N | peak traced memory (KiB) | KiB per candidate |\n|---:|---:|---:|\n"
        + "\n".join(
            f"| {m['n']} | {m['peak_kib']:.0f} | {m['kib_per_candidate']:.1f} |" for m in mem
        ),
    ]

    print("3/5 tracing cost ...", file=sys.stderr)
    tracing = orchestration.tracing_cost(
        n=4 if args.quick else 16, latency=latency, repeats=repeats
    )
    if tracing is None:
        sections += [
            "## 3. Tracing cost",
            "Waiting for the OpenTelemetry integration (`fusion-graph[otel]` not installed).",
        ]
    else:
        ok = "met" if tracing["wall_extra"] <= 0.03 else "missed"
        sections += [
            "## 3. Tracing cost (OpenTelemetry on, in-memory exporter, vs off)",
            "| N | wall time extra | target | CPU time extra (zero-latency models) |\n"
            "|---:|---:|---|---:|\n"
            f"| {tracing['n']} | {tracing['wall_extra'] * 100:+.1f} % | <= 3 %: {ok} | "
            f"{tracing['cpu_extra'] * 100:+.0f} % |",
        ]

    print("4/5 embedded model ...", file=sys.stderr)
    if args.no_local:
        sections += ["## 4. Embedded model", "Skipped (--no-local)."]
    else:
        from benchmarks import local_model

        local_rows = local_model.run([1, 2] if args.quick else [1, 4, 8], 8 if args.quick else 64)
        sections += [
            "## 4. Embedded model (SmolLM2-135M-Instruct, llama.cpp, CPU)",
            "Target: N=4 candidates <= 2.5 x the wall time of one candidate.",
            local_model.to_markdown(local_rows),
        ]

    print("5/5 durable fan-out ...", file=sys.stderr)
    durable_rows = durable.measure(
        [2] if args.quick else durable.SIZES, latency=latency, repeats=repeats
    )
    sections += [
        "## 5. Durable fan-out: the cost of a checkpointer",
        durable.legend(latency) + " Standalone: `python -m benchmarks.durable` "
        "(writes [durable.md](durable.md)).",
        durable.to_markdown(durable_rows),
    ]

    sections.append(f"Total benchmark time: {time.perf_counter() - started:.0f} s.")
    text = "\n\n".join(sections) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
