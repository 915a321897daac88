"""The straggler cut-off (``min_candidates=k, grace=g``) on heavy-tailed model latency.

python -m benchmarks.spend [--runs 200] [--sync-runs 200] [--sigma 1.0] [--seed 0] [--out F]

What is measured: the wall time of one FusioN run of N=8 candidates whose latencies are
drawn from a lognormal (median 200 ms, ``sigma`` 1.0: p99 about 10x the median), with
and without the grace window, and what the cut costs in candidates. Each run draws 8
fresh latencies from a seeded ``random.Random`` and builds its own
:class:`~fusion_graph.testing.FakeChatModel` with ``delays=`` set to them; the fusor is a
fake with a fixed 50 ms delay. Every arm of a run (without, then each ``(k, g)``) gets
the same 8 draws, and the jobs are queued run by run, arm by arm, so drift on the machine
lands on all arms alike; every ratio is between arms of the same benchmark run.

* ``without``: ``fusion_of_n(gen, n=8, fusor=fusor, seed=0)``;
* ``k=K, g=G s``: the same with ``min_candidates=K, grace=G``.

Async path: ``arun`` (``ainvoke`` plus the candidates), 16 runs (default) in flight on one
event loop (the fakes ``asyncio.sleep``, so runs barely compete for CPU; the first wave's
starts are staggered by 10 ms). Sync path: ``run`` (``invoke`` plus the candidates) on the
same draws from 8 threads (default); the model calls run on fusion-graph's thread pool, and
the fakes ``time.sleep`` in 10 ms steps and stop when
:func:`fusion_graph.runtime.stop_requested` says so. After a warm-up run, ``gc.freeze()``
keeps the occasional full collection from rescanning the import-time heap (``--no-freeze``
to see what that costs).

Besides the timings, every run is checked structurally (second table): the calls the fake
generator saw cancelled (``CallRecorder.cancelled``) against the candidates recorded as
cancelled (``status == "cancelled"``, ``stopped == "grace"``), on the sync path after a
short poll (a stopped sync call ends on its worker thread a moment after the run moved on);
a call cancelled at the fake whose candidate was kept must never happen. Where the two
differ the other way, the fake's reply time against the candidate's ``cancelled`` event
says which: a reply made *before* the cut that was dropped anyway, or (sync) a fake that
replied after being told to stop because it was in its last 10 ms sleep step. The cancelled
set must also be the one the draws predict (the candidates slower than the k-th fastest
plus g), ignoring candidates within ``TOLERANCE`` of the cut; the fusor must have seen
exactly the kept candidates. ``ideal`` is that prediction's wall time:
``min(slowest, k-th fastest + g) + fusor delay``, and ``overhead`` the measured wall time
over it.

Answer quality is not measured: a cancelled candidate's answer is simply lost to the
fusor.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_graph import fusion_of_n
from fusion_graph.testing import CallRecorder, FakeCall, FakeChatModel

N = 8
MEDIAN = 0.2
SIGMA = 1.0
FUSOR_DELAY = 0.05
RUNS = 200
SYNC_RUNS = 200
CONCURRENCY = 16
SYNC_CONCURRENCY = 8
STAGGER = 0.01  # seconds between the starts of the first wave of runs
TOLERANCE = 0.03  # seconds around the predicted cut where either outcome is fine
SYNC_POLL = 0.25  # seconds to wait for a stopped sync call to end on its thread


@dataclass(frozen=True)
class Arm:
    """One way to run the same draws: without the cut (``k=None``), or with it."""

    k: int | None = None
    grace: float | None = None

    @property
    def label(self) -> str:
        return "without" if self.k is None else f"k={self.k}, g={self.grace:g} s"

    def build(
        self, delays: Sequence[float], recorder: CallRecorder, fusor_delay: float, clock: Clock
    ) -> Any:
        gen = FakeChatModel(
            replies=clock.reply,
            delays=list(delays),
            recorder=recorder,
            usage=False,
        )
        fusor = FakeChatModel(replies=["fused"], delay=fusor_delay, recorder=recorder, usage=False)
        if self.k is None:
            return fusion_of_n(gen, n=len(delays), fusor=fusor, seed=0)
        return fusion_of_n(
            gen, n=len(delays), fusor=fusor, seed=0, min_candidates=self.k, grace=self.grace
        )

    def predicted_cut(self, delays: Sequence[float]) -> float | None:
        """When the window closes, counted from the run's start (``None``: never)."""
        if self.k is None or self.grace is None:
            return None
        return sorted(delays)[self.k - 1] + self.grace

    def ideal(self, delays: Sequence[float], fusor_delay: float) -> float:
        """The run's wall time with no orchestration cost."""
        cut = self.predicted_cut(delays)
        slowest = max(delays)
        return (slowest if cut is None else min(slowest, cut)) + fusor_delay


ARMS = [Arm(), Arm(4, 0.1), Arm(6, 0.1), Arm(4, 0.3)]


@dataclass
class Clock:
    """When each generator call replied (the fake's reply is made after its delay) and
    when each candidate was declared cancelled (its ``candidate_finished`` event)."""

    replied: dict[int, float] = field(default_factory=dict)
    cut: dict[int, float] = field(default_factory=dict)

    def reply(self, call: FakeCall) -> str:
        index = call.index or 0
        self.replied[index] = time.perf_counter()
        return f"answer {index}"

    def on_event(self, event: Any) -> None:
        if event.get("event") == "candidate_finished" and event.get("status") == "cancelled":
            self.cut[event["index"]] = time.perf_counter()

    def dropped_after_reply(self) -> list[float]:
        """For each cancelled candidate whose call had replied: how long before the cut."""
        return [self.cut[i] - self.replied[i] for i in self.cut if i in self.replied]


def draw_delays(
    runs: int, n: int = N, median: float = MEDIAN, sigma: float = SIGMA, seed: int = 0
) -> list[list[float]]:
    """``runs`` x ``n`` lognormal latencies in seconds (seeded, reproducible)."""
    rng = random.Random(seed)
    mu = math.log(median)
    return [[rng.lognormvariate(mu, sigma) for _ in range(n)] for _ in range(runs)]


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (linear interpolation between order statistics)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def tail_ratio(draws: Sequence[Sequence[float]]) -> dict[str, float]:
    """Median, p99 and p99 / median of all the per-candidate draws."""
    flat = [d for run in draws for d in run]
    p50, p99 = quantile(flat, 0.5), quantile(flat, 0.99)
    return {"draws": len(flat), "p50_s": p50, "p99_s": p99, "p99_vs_p50": p99 / p50}


def _sample(
    arm: Arm,
    delays: Sequence[float],
    result: Any,
    recorder: CallRecorder,
    wall: float,
    fusor_delay: float,
    clock: Clock,
) -> dict[str, Any]:
    """What one run of one arm did, and whether it did what the draws predict."""
    statuses = [c.status for c in result.candidates]
    cancelled = {c.index for c in result.candidates if c.status == "cancelled"}
    at_fake = {c.index for c in recorder.cancelled if c.role == "generator"}
    cut = arm.predicted_cut(delays)
    as_predicted = all(
        (i in cancelled) == (cut is not None and d > cut)
        for i, d in enumerate(delays)
        if cut is None or abs(d - cut) > TOLERANCE
    )
    fused = [c.prompt.count("<candidate index=") for c in recorder.by_role("fusor")]
    return {
        "arm": arm.label,
        "delays": list(delays),
        "wall_s": wall,
        "ideal_s": arm.ideal(delays, fusor_delay),
        "ok": statuses.count("ok"),
        "cancelled": sorted(cancelled),
        "at_fake": sorted(at_fake),
        "grace_stopped": all(
            c.stopped == "grace" for c in result.candidates if c.index in cancelled
        ),
        "as_predicted": as_predicted,
        "dropped_after_reply": clock.dropped_after_reply(),
        "fusor_saw_kept": result.message.text == "fused" and fused == [statuses.count("ok")],
    }


def _fake_cancelled(recorder: CallRecorder) -> int:
    return sum(c.role == "generator" for c in recorder.cancelled)


def _frozen_heap(freeze: bool) -> None:
    """Collect, then (``freeze``) move everything alive to the permanent generation, so
    that the occasional full collection during the timed runs does not rescan the
    import-time heap (langchain, pydantic, langgraph: a full collection of it takes tens
    of ms on a small machine and stalls every run in flight alike)."""
    gc.collect()
    if freeze:
        gc.freeze()


def run_async(
    draws: Sequence[Sequence[float]],
    arms: Sequence[Arm] = ARMS,
    *,
    fusor_delay: float = FUSOR_DELAY,
    concurrency: int = CONCURRENCY,
    stagger: float = STAGGER,
    freeze: bool = True,
) -> list[dict[str, Any]]:
    """Every arm on every draw with ``arun``, ``concurrency`` runs in flight; one sample
    per (run, arm). ``freeze``: see :func:`_frozen_heap`."""
    if not draws:
        return []
    jobs = [(arm, delays) for delays in draws for arm in arms]

    async def one(arm: Arm, delays: Sequence[float]) -> dict[str, Any]:
        recorder = CallRecorder()
        clock = Clock()
        step = arm.build(delays, recorder, fusor_delay, clock)
        start = time.perf_counter()
        result = await step.arun("q?", on_event=clock.on_event)
        wall = time.perf_counter() - start
        # The cut awaits the cancelled tasks before deciding: no poll needed here.
        return _sample(arm, delays, result, recorder, wall, fusor_delay, clock)

    async def all_jobs() -> list[dict[str, Any]]:
        await one(Arm(), [0.0] * len(draws[0]))  # warm-up (imports, first-call caches)
        _frozen_heap(freeze)
        samples: list[dict[str, Any] | None] = [None] * len(jobs)
        queue = iter(range(len(jobs)))

        async def worker(number: int) -> None:
            await asyncio.sleep(number * stagger)
            for j in queue:
                samples[j] = await one(*jobs[j])

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return [s for s in samples if s is not None]

    try:
        return asyncio.run(all_jobs())
    finally:
        gc.unfreeze()


def run_sync(
    draws: Sequence[Sequence[float]],
    arms: Sequence[Arm] = ARMS,
    *,
    fusor_delay: float = FUSOR_DELAY,
    concurrency: int = SYNC_CONCURRENCY,
    stagger: float = STAGGER,
    poll: float = SYNC_POLL,
    freeze: bool = True,
) -> list[dict[str, Any]]:
    """Every arm on every draw with ``run`` (sync), from ``concurrency`` threads."""
    if not draws:
        return []
    jobs = [(arm, delays) for delays in draws for arm in arms]
    lock = threading.Lock()
    queue = iter(range(len(jobs)))
    samples: list[dict[str, Any] | None] = [None] * len(jobs)

    def one(arm: Arm, delays: Sequence[float]) -> dict[str, Any]:
        recorder = CallRecorder()
        clock = Clock()
        step = arm.build(delays, recorder, fusor_delay, clock)
        start = time.perf_counter()
        result = step.run("q?", on_event=clock.on_event)
        wall = time.perf_counter() - start
        expected = sum(c.status == "cancelled" for c in result.candidates)
        end = time.monotonic() + poll
        while _fake_cancelled(recorder) < expected and time.monotonic() < end:
            time.sleep(0.005)
        return _sample(arm, delays, result, recorder, wall, fusor_delay, clock)

    def worker(number: int) -> None:
        time.sleep(number * stagger)
        while True:
            with lock:
                j = next(queue, None)
            if j is None:
                return
            samples[j] = one(*jobs[j])

    one(Arm(), [0.0] * len(draws[0]))  # warm-up
    _frozen_heap(freeze)
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(worker, range(concurrency)))
    finally:
        gc.unfreeze()
    return [s for s in samples if s is not None]


def summarize(samples: Sequence[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    """One row per arm: run latency percentiles, the p99 ratio to ``without``, what was
    kept and cancelled, and the structural checks."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_arm.setdefault(s["arm"], []).append(s)
    rows: list[dict[str, Any]] = []
    for label, group in by_arm.items():
        walls = [s["wall_s"] for s in group]
        ideals = [s["ideal_s"] for s in group]
        gaps = [g for s in group for g in s["dropped_after_reply"]]
        rows.append(
            {
                "path": path,
                "arm": label,
                "runs": len(group),
                "p50_s": quantile(walls, 0.5),
                "p90_s": quantile(walls, 0.9),
                "p99_s": quantile(walls, 0.99),
                "mean_s": statistics.fmean(walls),
                "ideal_p99_s": quantile(ideals, 0.99),
                "overhead_p50_s": quantile(
                    [w - i for w, i in zip(walls, ideals, strict=True)], 0.5
                ),
                "kept": statistics.fmean(s["ok"] for s in group),
                "cancelled": statistics.fmean(len(s["cancelled"]) for s in group),
                "cancelled_total": sum(len(s["cancelled"]) for s in group),
                "fake_match": sum(
                    s["at_fake"] == s["cancelled"] and s["grace_stopped"] for s in group
                ),
                # calls cancelled at the fake whose candidate is not cancelled: must be 0
                "cut_but_kept": sum(len(set(s["at_fake"]) - set(s["cancelled"])) for s in group),
                # cancelled candidates whose fake call had replied before the cut
                "replied_then_cut": [g for g in gaps if g > 0],
                # sync: the fake replied after being told to stop (its last 10 ms slice)
                "replied_after_stop": sum(g <= 0 for g in gaps),
                "as_predicted": sum(s["as_predicted"] for s in group),
                "fusor_saw_kept": sum(s["fusor_saw_kept"] for s in group),
            }
        )
    without = next((r for r in rows if r["arm"] == "without"), None)
    for r in rows:
        if without is not None:
            r["p99_vs_without"] = r["p99_s"] / without["p99_s"]
            r["mean_vs_without"] = r["mean_s"] / without["mean_s"]
            r["ideal_p99_vs_without"] = r["ideal_p99_s"] / without["ideal_p99_s"]
    return rows


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The latency table: run latency per arm and path, the ratios to ``without``, the
    ideal (the draws' own) p99 and what was kept."""
    nan = float("nan")
    lines = [
        "| path | arm | runs | p50 ms | p90 ms | p99 ms | mean ms | p99 ÷ without "
        "| mean ÷ without | ideal p99 ms | ideal p99 ÷ without | overhead p50 ms "
        "| kept (ok) | cancelled |",
        "|---|---|" + "---:|" * 12,
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['arm']} | {r['runs']} | {r['p50_s'] * 1000:.0f} | "
            f"{r['p90_s'] * 1000:.0f} | {r['p99_s'] * 1000:.0f} | {r['mean_s'] * 1000:.0f} | "
            f"{r.get('p99_vs_without', nan):.3f} | {r.get('mean_vs_without', nan):.3f} | "
            f"{r['ideal_p99_s'] * 1000:.0f} | {r.get('ideal_p99_vs_without', nan):.3f} | "
            f"{r['overhead_p50_s'] * 1000:.1f} | {r['kept']:.2f} | {r['cancelled']:.2f} |"
        )
    return "\n".join(lines)


def checks_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The structural checks per arm and path."""
    lines = [
        "| path | arm | cancelled candidates | runs: cut = cancelled at the fake "
        "| replied before the cut, then cut (max ms before) | replied after told to stop "
        "| calls cancelled at the fake, candidate kept | runs: cut as predicted "
        "| runs: fusor saw exactly the kept |",
        "|---|---|" + "---:|" * 7,
    ]
    for r in rows:
        late = r["replied_then_cut"]
        late_cell = f"{len(late)} ({max(late) * 1000:.1f})" if late else "0"
        lines.append(
            f"| {r['path']} | {r['arm']} | {r['cancelled_total']} | "
            f"{r['fake_match']}/{r['runs']} | {late_cell} | {r['replied_after_stop']} | "
            f"{r['cut_but_kept']} | {r['as_predicted']}/{r['runs']} | "
            f"{r['fusor_saw_kept']}/{r['runs']} |"
        )
    return "\n".join(lines)


def target_note(rows: Sequence[dict[str, Any]]) -> str:
    """The issue's target, p99 with grace <= 0.3 x without, per arm and path."""
    notes = [
        f"{r['path']} {r['arm']}: {r['p99_vs_without']:.3f} "
        f"({'met' if r['p99_vs_without'] <= 0.3 else 'missed'})"
        for r in rows
        if r["arm"] != "without" and "p99_vs_without" in r
    ]
    return "Target p99 with grace <= 0.3 x without: " + "; ".join(notes) + "."


def measure(
    runs: int = RUNS,
    sync_runs: int = SYNC_RUNS,
    *,
    arms: Sequence[Arm] = ARMS,
    median: float = MEDIAN,
    sigma: float = SIGMA,
    seed: int = 0,
    fusor_delay: float = FUSOR_DELAY,
    concurrency: int = CONCURRENCY,
    sync_concurrency: int = SYNC_CONCURRENCY,
    freeze: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The async pass on ``runs`` draws, the sync pass on the first ``sync_runs`` of them,
    and the tail of the async pass's draws."""
    draws = draw_delays(max(runs, sync_runs), median=median, sigma=sigma, seed=seed)
    rows: list[dict[str, Any]] = []
    if progress:
        progress(f"async: {runs} runs x {len(arms)} arms, {concurrency} in flight ...")
    started = time.perf_counter()
    samples = run_async(
        draws[:runs], arms, fusor_delay=fusor_delay, concurrency=concurrency, freeze=freeze
    )
    rows += summarize(samples, "async")
    async_s = time.perf_counter() - started
    sync_s = 0.0
    if sync_runs:
        if progress:
            progress(f"sync: {sync_runs} runs x {len(arms)} arms, {sync_concurrency} threads ...")
        started = time.perf_counter()
        samples = run_sync(
            draws[:sync_runs],
            arms,
            fusor_delay=fusor_delay,
            concurrency=sync_concurrency,
            freeze=freeze,
        )
        rows += summarize(samples, "sync")
        sync_s = time.perf_counter() - started
    return {
        "rows": rows,
        "tail": tail_ratio(draws[: runs or sync_runs]),
        "async_s": async_s,
        "sync_s": sync_s,
    }


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.spend", description=__doc__)
    parser.add_argument("--runs", type=int, default=RUNS, help="async runs (draws of 8)")
    parser.add_argument("--sync-runs", type=int, default=SYNC_RUNS, help="sync runs (0: skip)")
    parser.add_argument("--median", type=float, default=MEDIAN, help="median latency, s")
    parser.add_argument("--sigma", type=float, default=SIGMA, help="lognormal sigma")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latency draws")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="async in flight")
    parser.add_argument(
        "--sync-concurrency", type=int, default=SYNC_CONCURRENCY, help="sync threads"
    )
    parser.add_argument("--no-freeze", action="store_true", help="no gc.freeze() after the warm-up")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)

    shown = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.spend", *shown])
    load_before = _load()
    started = time.perf_counter()
    result = measure(
        args.runs,
        args.sync_runs,
        median=args.median,
        sigma=args.sigma,
        seed=args.seed,
        concurrency=args.concurrency,
        sync_concurrency=args.sync_concurrency,
        freeze=not args.no_freeze,
        progress=lambda s: print(s, file=sys.stderr),
    )
    tail = result["tail"]
    text = "\n\n".join(
        [
            "# Straggler cut-off on heavy-tailed latency",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}; 1-min load average {load_before:.2f} before, "
            f"{_load():.2f} after. "
            f"Command: `{command}`. "
            f"N={N}, generator latency lognormal(median {args.median * 1000:.0f} ms, "
            f"sigma {args.sigma:g}), seed {args.seed}: {tail['draws']} draws, median "
            f"{tail['p50_s'] * 1000:.0f} ms, p99 {tail['p99_s'] * 1000:.0f} ms, "
            f"p99 ÷ median {tail['p99_vs_p50']:.1f}. Fusor: fixed {FUSOR_DELAY * 1000:.0f} ms. "
            f"Async: {args.runs} runs per arm, {args.concurrency} in flight "
            f"({result['async_s']:.0f} s); sync: the first {args.sync_runs} draws, "
            f"{args.sync_concurrency} threads ({result['sync_s']:.0f} s); total "
            f"{time.perf_counter() - started:.0f} s; "
            f"{'no gc.freeze()' if args.no_freeze else 'gc.freeze() after the warm-up'}.",
            to_markdown(result["rows"]),
            target_note(result["rows"]),
            "Checks (every run of every arm):",
            checks_markdown(result["rows"]),
        ]
    )
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
