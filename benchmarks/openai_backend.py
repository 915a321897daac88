"""The OpenAI-compatible backend against a loopback fake server: every path as a ratio to the
ideal and to a hand-written floor (raw ``httpx`` + ``asyncio.gather``), measured in one run.

The server (:mod:`benchmarks.fake_server`) runs in a process of its own and answers after a
fixed latency, honouring ``n`` (vLLM) or ignoring it (llama.cpp's server, many hosted APIs).
Each path is one strategy (fusion, BoN with a pointwise judge, BoN with a pairwise knockout,
majority vote) at one N, run through the async API (``ainvoke``) and the sync one (``invoke``).

* **ideal**: the critical path of model calls at the server's latency: one candidate round,
  then the decision's rounds (fusion and judge: one; pairwise: ``ceil(log2 N)``; vote: none).
* **floor**: the same requests written by hand with one ``httpx.AsyncClient`` (httpx2, the
  OpenAI SDK's successor of httpx, when installed) and ``asyncio.gather`` (one ``n=N``
  request or N requests, then the decision's requests).
* **CPU / request**: the client process's CPU time over the timed runs divided by the
  requests the server received (so it includes fusion-graph's orchestration).

``request_cpu`` measures the chat model alone: 64 concurrent calls, CPU time per call, next to
raw httpx making the same requests.

    python -m benchmarks.openai_backend                  # N = 4, 16, 64
    python -m benchmarks.openai_backend --sizes 64 --strategies bon:judge --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

try:  # httpx's successor (the OpenAI SDK's HTTP library): httpx 0.x's connection pool
    # spends ~4 ms of CPU per request with 64 connections open, which is no floor
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from benchmarks.fake_server import fake_server
from fusion_graph import LLMJudge, MajorityVote, PairwiseJudge, best_of_n, fusion_of_n
from fusion_graph.integrations.openai_compat import forget_endpoint, openai_compatible
from fusion_graph.runtime import THREAD_POOL

LATENCY = 0.1
STRATEGIES = ("fusion", "bon:judge", "bon:pairwise", "vote")
SIZES = (4, 16, 64)
MESSAGES = [{"role": "user", "content": "What is six times seven?"}]


def decision_rounds(strategy: str, n: int) -> int:
    """Sequential rounds of decision calls after the candidates."""
    if strategy == "vote":
        return 0
    if strategy == "bon:pairwise":
        return math.ceil(math.log2(n)) if n > 1 else 0
    return 1


def build(strategy: str, base_url: str, n: int) -> Any:
    llm = openai_compatible(base_url, "fake", max_retries=0, timeout=30)
    if strategy == "fusion":
        return fusion_of_n(llm, n=n, fusor=llm, seed=0)
    if strategy == "bon:judge":
        return best_of_n(llm, n=n, selector=LLMJudge(llm), seed=0)
    if strategy == "bon:pairwise":
        return best_of_n(llm, n=n, selector=PairwiseJudge(llm), seed=0)
    if strategy == "vote":
        return best_of_n(llm, n=n, selector=MajorityVote(), seed=0)
    raise ValueError(strategy)


# -- the hand-written floor ------------------------------------------------------------------


def floor_run(
    client: httpx.AsyncClient, base_url: str, strategy: str, n: int, honour_n: bool
) -> Callable[[], Awaitable[None]]:
    url = f"{base_url}/chat/completions"

    async def post(body: dict[str, Any]) -> dict[str, Any]:
        response = await client.post(url, json={"model": "fake", "messages": MESSAGES, **body})
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    async def run() -> None:
        if honour_n and n > 1:
            await post({"n": n, "seed": 0})
        else:
            await asyncio.gather(*(post({"seed": i}) for i in range(n)))
        if strategy == "fusion":
            await post({})
        elif strategy == "bon:judge":
            await asyncio.gather(*(post({}) for _ in range(n)))
        elif strategy == "bon:pairwise":
            alive = n
            while alive > 1:
                await asyncio.gather(*(post({}) for _ in range(2 * (alive // 2))))
                alive = alive // 2 + alive % 2

    return run


def _client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    return httpx.AsyncClient(limits=limits, timeout=30)


# -- timing ----------------------------------------------------------------------------------


def _server_requests(base_url: str) -> int:
    return int(httpx.get(f"{base_url}/stats").json()["requests"])


def _timed_async(make: Callable[[], Awaitable[Any]], repeats: int) -> tuple[list[float], float]:
    async def runs() -> tuple[list[float], float]:
        await make()  # warm-up (and n detection)
        times = []
        cpu = time.process_time()
        for _ in range(repeats):
            start = time.perf_counter()
            await make()
            times.append(time.perf_counter() - start)
        return times, time.process_time() - cpu

    return asyncio.run(runs())


def _timed_sync(run: Callable[[], Any], repeats: int) -> tuple[list[float], float]:
    run()
    times = []
    cpu = time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times, time.process_time() - cpu


def measure(
    sizes: Sequence[int] = SIZES,
    strategies: Sequence[str] = STRATEGIES,
    *,
    latency: float = LATENCY,
    repeats: int = 5,
    server_modes: Sequence[bool] = (True, False),
) -> list[dict[str, Any]]:
    """One row per (server mode, strategy, N, path)."""
    rows: list[dict[str, Any]] = []
    for honour_n in server_modes:
        with fake_server(latency, honour_n=honour_n) as base_url:
            for n in sizes:
                for strategy in strategies:
                    ideal = (1 + decision_rounds(strategy, n)) * latency

                    async def floor_runs(
                        s: str = strategy, k: int = n, honoured: bool = honour_n
                    ) -> list[float]:
                        async with _client() as client:
                            run = floor_run(client, base_url, s, k, honoured)
                            await run()
                            times = []
                            for _ in range(repeats):
                                start = time.perf_counter()
                                await run()
                                times.append(time.perf_counter() - start)
                            return times

                    floor = statistics.median(asyncio.run(floor_runs()))
                    runnable = build(strategy, base_url, n)
                    for path in ("async", "sync"):
                        before = _server_requests(base_url)
                        if path == "async":
                            times, cpu = _timed_async(lambda r=runnable: r.ainvoke("q"), repeats)
                        else:
                            times, cpu = _timed_sync(lambda r=runnable: r.invoke("q"), repeats)
                        requests = (_server_requests(base_url) - before) * repeats / (repeats + 1)
                        wall = statistics.median(times)
                        rows.append(
                            {
                                "server": "n honoured" if honour_n else "n ignored",
                                "strategy": strategy,
                                "n": n,
                                "path": path,
                                "wall_s": wall,
                                "ideal_s": ideal,
                                "vs_ideal": wall / ideal,
                                "floor_vs_ideal": floor / ideal,
                                "vs_floor": wall / floor,
                                "cpu_ms_per_request": 1000 * cpu / max(requests, 1),
                            }
                        )
                        print(_row_line(rows[-1]), file=sys.stderr)
            forget_endpoint(base_url)
    return rows


def request_cpu(concurrent: int = 64, rounds: int = 10) -> dict[str, float]:
    """CPU µs per request: raw httpx, the chat model's ``ainvoke`` and its ``invoke`` (on a
    thread pool), ``concurrent`` calls at a time, zero-latency server."""
    out: dict[str, float] = {}
    with fake_server(0.0, honour_n=True) as base_url:
        llm = openai_compatible(base_url, "fake", max_retries=0, timeout=30)
        judge_like = llm.bind(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "v", "schema": {"type": "object"}, "strict": True},
            }
        )

        async def raw() -> None:
            async with _client() as client:
                url = f"{base_url}/chat/completions"
                body = {"model": "fake", "messages": MESSAGES}
                for _ in range(2):  # warm-up round, then the measured ones
                    await asyncio.gather(*(client.post(url, json=body) for _ in range(concurrent)))
                start = time.process_time()
                for _ in range(rounds):
                    replies = await asyncio.gather(
                        *(client.post(url, json=body) for _ in range(concurrent))
                    )
                    for reply in replies:
                        reply.json()
                out["raw httpx (async)"] = (time.process_time() - start) / (rounds * concurrent)

        async def model(name: str, runnable: Any) -> None:
            for _ in range(2):
                await asyncio.gather(*(runnable.ainvoke("q") for _ in range(concurrent)))
            start = time.process_time()
            for _ in range(rounds):
                await asyncio.gather(*(runnable.ainvoke("q") for _ in range(concurrent)))
            out[name] = (time.process_time() - start) / (rounds * concurrent)

        asyncio.run(raw())
        asyncio.run(model("ainvoke", llm))
        asyncio.run(model("ainvoke, response_format bound", judge_like))
        for _ in range(2):
            list(THREAD_POOL.map(lambda _: llm.invoke("q"), range(concurrent)))
        start = time.process_time()
        for _ in range(rounds):
            list(THREAD_POOL.map(lambda _: llm.invoke("q"), range(concurrent)))
        out["invoke (threads)"] = (time.process_time() - start) / (rounds * concurrent)
        forget_endpoint(base_url)
    return {name: seconds * 1e6 for name, seconds in out.items()}


# -- reporting -------------------------------------------------------------------------------


def _row_line(r: dict[str, Any]) -> str:
    return (
        f"{r['server']:10} {r['strategy']:12} N={r['n']:<3} {r['path']:5} "
        f"wall {r['wall_s'] * 1000:6.0f} ms  ÷ideal {r['vs_ideal']:.3f}  "
        f"floor÷ideal {r['floor_vs_ideal']:.3f}  ÷floor {r['vs_floor']:.3f}  "
        f"CPU/request {r['cpu_ms_per_request']:.2f} ms"
    )


def target(r: dict[str, Any]) -> float | None:
    """The issue's bound on ÷ ideal for this row (issue 19)."""
    if r["n"] == 16:
        return 1.10
    if r["n"] == 64:
        return 1.5 if r["strategy"] == "bon:judge" else 1.25
    return None


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| server | strategy | N | path | wall (ms) | ÷ ideal | floor ÷ ideal | ÷ floor "
        "| CPU / request (ms) | target ÷ ideal |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        bound = target(r)
        note = (
            ""
            if bound is None
            else f"≤ {bound:.2f}: {'met' if r['vs_ideal'] <= bound else 'missed'}"
        )
        lines.append(
            f"| {r['server']} | {r['strategy']} | {r['n']} | {r['path']} | "
            f"{r['wall_s'] * 1000:.0f} | {r['vs_ideal']:.3f} | {r['floor_vs_ideal']:.3f} | "
            f"{r['vs_floor']:.3f} | {r['cpu_ms_per_request']:.2f} | {note} |"
        )
    return "\n".join(lines)


def async_vs_sync(rows: Sequence[dict[str, Any]]) -> str:
    """async ÷ sync wall time per path (the target: at most 1)."""
    pairs: dict[tuple[str, str, int], dict[str, float]] = {}
    for r in rows:
        pairs.setdefault((r["server"], r["strategy"], r["n"]), {})[r["path"]] = r["wall_s"]
    lines = ["| server | strategy | N | async ÷ sync |", "|---|---|---:|---:|"]
    for (server, strategy, n), walls in pairs.items():
        if "async" in walls and "sync" in walls:
            lines.append(f"| {server} | {strategy} | {n} | {walls['async'] / walls['sync']:.3f} |")
    return "\n".join(lines)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.openai_backend")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency", type=float, default=LATENCY)
    parser.add_argument("--server", choices=["both", "honoured", "ignored"], default="both")
    parser.add_argument("--no-request-cpu", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.openai_backend", *(argv or sys.argv[1:])])
    modes = {"both": (True, False), "honoured": (True,), "ignored": (False,)}[args.server]
    before = load()
    print(f"before: {before}", file=sys.stderr)
    rows = measure(
        [int(s) for s in args.sizes.split(",")],
        args.strategies.split(","),
        latency=args.latency,
        repeats=args.repeats,
        server_modes=modes,
    )
    sections = [
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. Latency {args.latency * 1000:.0f} ms, median of "
        f"{args.repeats}. Load before: {before}; after: {load()}.",
        to_markdown(rows),
        async_vs_sync(rows),
    ]
    if not args.no_request_cpu:
        cpu = request_cpu()
        sections.append(
            "| chat model alone, 64 concurrent calls | CPU µs / request |\n|---|---:|\n"
            + "\n".join(f"| {name} | {us:.0f} |" for name, us in cpu.items())
        )
    text = "\n\n".join(sections) + "\n"
    if args.out is not None:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
