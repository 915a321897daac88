"""What the orchestration costs: wall time against the ideal, a hand-written floor and a
sequential loop; CPU per candidate; memory growth in N; tracing overhead.

Models are fakes with a fixed latency (``asyncio.sleep`` / ``time.sleep``), so only
fusion-graph's own work is measured. Every figure is a ratio of two timings taken in the
same run, so machine noise mostly cancels.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fusion_graph import LLMJudge, fusion_of_n
from fusion_graph.testing import FakeChatModel
from fusion_graph.wrap import best_of_n

LATENCY = 0.1


def _reward(messages: Any, candidate: Any) -> float:
    return float(len(candidate.text))


@dataclass(frozen=True)
class Config:
    """One strategy to measure, and how many model-call latencies its ideal run takes."""

    name: str
    ideal_calls: int  # sequential latencies on the critical path

    def build(self, n: int, latency: float) -> Any:
        gen = FakeChatModel(replies=["candidate answer"], delay=latency, usage=False)
        slow = FakeChatModel(replies=['{"score": 7}'], delay=latency, usage=False)
        if self.name == "fusion":
            return fusion_of_n(gen, n=n, fusor=slow, seed=0)
        if self.name == "fusion+critic":
            return fusion_of_n(gen, n=n, fusor=slow, critic=slow, seed=0)
        if self.name == "bon:reward":
            return best_of_n(gen, n=n, selector=_reward, seed=0)
        if self.name == "bon:judge":
            return best_of_n(gen, n=n, selector=LLMJudge(slow), seed=0)
        raise ValueError(self.name)


CONFIGS = [
    Config("fusion", 2),
    Config("bon:reward", 1),
    Config("bon:judge", 2),
    Config("fusion+critic", 3),
]


def _median_async(make: Callable[[], Awaitable[Any]], repeats: int) -> float:
    async def timed() -> float:
        start = time.perf_counter()
        await make()
        return time.perf_counter() - start

    async def all_runs() -> list[float]:
        await make()  # warm-up
        return [await timed() for _ in range(repeats)]

    return statistics.median(asyncio.run(all_runs()))


def _median_sync(run: Callable[[], Any], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gather_floor(n: int, latency: float, calls: int) -> Callable[[], Awaitable[Any]]:
    """Hand-written asyncio: N ``ainvoke`` at once, then the decision call(s)."""
    gen = FakeChatModel(replies=["candidate answer"], delay=latency, usage=False)
    slow = FakeChatModel(replies=["fused"], delay=latency, usage=False)

    async def run() -> None:
        await asyncio.gather(*(gen.ainvoke("q") for _ in range(n)))
        for _ in range(calls - 1):
            await slow.ainvoke("decide")

    return run


def _thread_floor(n: int, latency: float) -> Callable[[], Any]:
    """Hand-written threads: N ``invoke`` on a pool of N threads, then the fusor call."""
    gen = FakeChatModel(replies=["candidate answer"], delay=latency, usage=False)
    slow = FakeChatModel(replies=["fused"], delay=latency, usage=False)
    pool = ThreadPoolExecutor(max_workers=max(n, 1))

    def run() -> None:
        list(pool.map(lambda _: gen.invoke("q"), range(n)))
        slow.invoke("decide")

    return run


def _sequential(n: int, latency: float) -> Callable[[], Awaitable[Any]]:
    """What DSPy's BestOfN does: one attempt after another, then the decision."""
    gen = FakeChatModel(replies=["candidate answer"], delay=latency, usage=False)
    slow = FakeChatModel(replies=["fused"], delay=latency, usage=False)

    async def run() -> None:
        for _ in range(n):
            await gen.ainvoke("q")
        await slow.ainvoke("decide")

    return run


def overhead(sizes: list[int], latency: float = LATENCY, repeats: int = 3) -> list[dict[str, Any]]:
    """Wall time / ideal for each strategy and N, async and (FusioN) sync."""
    rows: list[dict[str, Any]] = []
    for n in sizes:
        for config in CONFIGS:
            runnable = config.build(n, latency)
            wall = _median_async(lambda r=runnable: r.ainvoke("q"), repeats)
            floor = _median_async(_gather_floor(n, latency, config.ideal_calls), repeats)
            ideal = config.ideal_calls * latency
            row = {
                "n": n,
                "strategy": config.name,
                "path": "async",
                "wall_s": wall,
                "ideal_s": ideal,
                "vs_ideal": wall / ideal,
                "floor_vs_ideal": floor / ideal,
                "vs_floor": wall / floor,
            }
            if config.name == "fusion" and n <= 16:
                row["sequential_vs_ours"] = _median_async(_sequential(n, latency), 1) / wall
            rows.append(row)
        fused = CONFIGS[0].build(n, latency)
        wall = _median_sync(lambda f=fused: f.invoke("q"), repeats)
        floor = _median_sync(_thread_floor(n, latency), repeats)
        rows.append(
            {
                "n": n,
                "strategy": "fusion",
                "path": "sync",
                "wall_s": wall,
                "ideal_s": 2 * latency,
                "vs_ideal": wall / (2 * latency),
                "floor_vs_ideal": floor / (2 * latency),
                "vs_floor": wall / floor,
            }
        )
    return rows


def cpu_cost(n: int = 64, runs: int = 20) -> dict[str, Any]:
    """CPU seconds per candidate with zero-latency models (FusioN, async)."""
    fused = fusion_of_n(
        FakeChatModel(replies=["a"], usage=False), n=n, fusor=FakeChatModel(replies=["f"]), seed=0
    )

    async def many() -> None:
        for _ in range(runs):
            await fused.ainvoke("q")

    asyncio.run(many())  # warm-up
    start = time.process_time()
    asyncio.run(many())
    cpu = time.process_time() - start
    per_candidate = cpu / (n * runs)
    return {"n": n, "cpu_s_per_candidate": per_candidate, "candidates_per_cpu_s": 1 / per_candidate}


def memory(sizes: list[int]) -> list[dict[str, Any]]:
    """Peak traced memory of one FusioN run, by N."""
    rows = []
    for n in sizes:
        fused = fusion_of_n(
            FakeChatModel(replies=["a" * 200]), n=n, fusor=FakeChatModel(replies=["f"]), seed=0
        )
        fused.invoke("warm-up")
        gc.collect()
        tracemalloc.start()
        fused.invoke("q")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append({"n": n, "peak_kib": peak / 1024, "kib_per_candidate": peak / 1024 / n})
    return rows


def tracing_cost(n: int = 16, latency: float = LATENCY, repeats: int = 5) -> dict[str, Any] | None:
    """FusioN with the OpenTelemetry instrumentation on (in-memory exporter) vs off: wall
    time at the given model latency, and CPU time with zero-latency models."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from fusion_graph.integrations.opentelemetry import FusionGraphInstrumentor
    except ImportError:
        return None

    def build(delay: float) -> Any:
        return fusion_of_n(
            FakeChatModel(replies=["a"], delay=delay), n=n, fusor=FakeChatModel(delay=delay), seed=0
        )

    slow, fast = build(latency), build(0.0)

    async def cpu_runs() -> None:
        for _ in range(20):
            await fast.ainvoke("q")

    def cpu() -> float:
        start = time.process_time()
        asyncio.run(cpu_runs())
        return time.process_time() - start

    def measure() -> tuple[float, float]:
        wall = _median_async(lambda: slow.ainvoke("q"), repeats)
        return wall, min(cpu() for _ in range(4))  # the first run pays one-time costs

    wall_off, cpu_off = measure()
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = FusionGraphInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        wall_on, cpu_on = measure()
    finally:
        instrumentor.uninstrument()
    return {
        "n": n,
        "wall_extra": wall_on / wall_off - 1,
        "cpu_extra": cpu_on / cpu_off - 1,
    }
