"""``synth --ray`` against the single-process ``synth``: rows/s on a slow fake endpoint, at
1, 2 and 4 Ray workers, in one run; and the per-endpoint limit held across the cluster.

Teachers are the fake OpenAI-compatible server of ``tests/faults`` (every answer delayed
by ``--latency``, 200 ms by default), all behind one base URL; selector ``vote`` (no judge
call), the fusor on the same endpoint: a prompt costs one round of teacher requests and one
fusor request. The single-process job and every Ray worker keep ``--concurrency`` prompts
in flight, so N workers can do N times the work. Ray runs on a local instance (loopback)
started once for the whole run; each measurement includes starting its actor pool.

python -m benchmarks.ray               # 500 prompts x 5 teachers (~4 min on 2 cores)
python -m benchmarks.ray --prompts 40  # a smoke run

It prints the table recorded in benchmarks/ray.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fusion_graph.batch import CandidateStore, Defaults, JobModels, Synthesizer, run_synth
from fusion_graph.batch.data import PromptItem, read_prompts
from fusion_graph.batch.ray import SynthJob, ray_session, synth_on_ray
from fusion_graph.models import ModelSpec
from tests.faults.fake_openai import FakeOpenAI, Fault

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Result:
    name: str
    workers: int
    rows: int
    seconds: float
    peak_in_flight: int
    limit: int | None
    first_row: float = 0.0
    """Seconds until the first row came back (Ray: starting the actor pool)."""

    @property
    def rate(self) -> float:
        return self.rows / self.seconds

    @property
    def steady_rate(self) -> float:
        """Rows/s after the first row (start-up excluded)."""
        return (self.rows - 1) / max(self.seconds - self.first_row, 1e-9)


def _items(path: Path, count: int) -> list[PromptItem]:
    path.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(count)
        )
    )
    return read_prompts(path).items


def _job(fake: FakeOpenAI, teachers: int, limit: int | None) -> SynthJob:
    extra = f",concurrency={limit}" if limit else ""
    specs = [
        ModelSpec.parse(f"openai:{fake.base_url}:fake:name=t{i},temperature=0.{i + 1}{extra}")
        for i in range(teachers)
    ]
    defaults = Defaults(temperature=0.3, max_tokens=32, retries=0)
    return SynthJob(teachers=specs, defaults=defaults, selector="vote")


def _single(job: SynthJob, items: list[PromptItem], tmp: Path, concurrency: int) -> float:
    with CandidateStore(tmp / "single.sqlite") as db:
        synthesizer = Synthesizer.of(JobModels(job.teachers, job.defaults, db), selector="vote")
        started = time.perf_counter()
        asyncio.run(
            run_synth(
                items, synthesizer=synthesizer, output=tmp / "single.jsonl", concurrency=concurrency
            )
        )
        return time.perf_counter() - started


def _on_ray(
    job: SynthJob, items: list[PromptItem], tmp: Path, name: str, workers: int, concurrency: int
) -> tuple[float, float]:
    started = time.perf_counter()
    first: list[float] = []

    def on_event(kind: str, item: object, report: object) -> None:
        if kind == "row" and not first:
            first.append(time.perf_counter() - started)

    report = synth_on_ray(
        items,
        job,
        output=tmp / f"{name}.jsonl",
        store=tmp / f"{name}.sqlite",
        workers=workers,
        concurrency=concurrency,
        num_cpus=0.01,  # I/O bound: 4 workers share the 2 cores
        on_event=on_event,
    )
    assert report.written == len(items), report
    return time.perf_counter() - started, first[0]


def run(
    prompts: int, teachers: int, latency: float, concurrency: int, limit: int, sizes: list[int]
) -> list[Result]:
    results: list[Result] = []
    with FakeOpenAI() as fake, tempfile.TemporaryDirectory() as scratch, ray_session():
        tmp = Path(scratch)
        items = _items(tmp / "p.jsonl", prompts)
        slow = [(lambda r: True, Fault.slow_first_byte(latency))]
        job = _job(fake, teachers, None)

        fake.configure(rules=slow)
        seconds = _single(job, items, tmp, concurrency)
        results.append(Result("synth", 1, prompts, seconds, fake.peak_in_flight, None, 0.0))
        for workers in sizes:
            fake.configure(rules=slow)
            seconds, first = _on_ray(job, items, tmp, f"ray{workers}", workers, concurrency)
            peak = fake.peak_in_flight
            results.append(Result("synth --ray", workers, prompts, seconds, peak, None, first))
            print(results[0], results[-1], flush=True)
        # The limit: the most workers, a limit far below what they would send.
        fake.configure(rules=slow)
        bounded = _job(fake, teachers, limit)
        few = items[: max(prompts // 5, 20)]
        seconds, first = _on_ray(bounded, few, tmp, "limited", max(sizes), concurrency)
        peak = fake.peak_in_flight
        results.append(
            Result("synth --ray, limited", max(sizes), len(few), seconds, peak, limit, first)
        )
    return results


def table(results: list[Result], concurrency: int, teachers: int) -> str:
    base = results[0].rate
    lines = [
        "| job | workers | rows | seconds | rows/s | vs single process | first row at (s) | "
        "rows/s after it | max in flight at the server | endpoint limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ceiling = concurrency * teachers
    for r in results:
        limit = str(r.limit) if r.limit else f"none (64 per process; would allow {ceiling}/worker)"
        lines.append(
            f"| `{r.name}` | {r.workers} | {r.rows} | {r.seconds:.1f} | {r.rate:.1f} | "
            f"{r.rate / base:.2f}x | {r.first_row:.1f} | {r.steady_rate:.1f} | "
            f"{r.peak_in_flight} | {limit} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--teachers", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--sizes", default="1,2,4")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sizes = [int(s) for s in args.sizes.split(",")]
    load = os.getloadavg()
    results = run(args.prompts, args.teachers, args.latency, args.concurrency, args.limit, sizes)
    command = "python -m benchmarks.ray " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(
        f"Command: `{command.strip()}`; {machine}; load average before the run "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.\n"
    )
    print(table(results, args.concurrency, args.teachers))


if __name__ == "__main__":
    main()
