"""The proxy under load (loopback only, bounded): 500 ``fusion-4`` requests, 64 at a time,
against an upstream that takes 100 ms per request; then more requests at once than the
proxy admits.

Under load no request is lost or made twice (every answer is a well-formed 200, and the
upstream saw exactly one ``n=4`` candidates' request and one fusor request per question),
and the process's resident memory after the run stays within :data:`RSS_BOUND_MB` of what
it was before it. The latencies (p50/p99 against the ideal of two upstream round trips)
are printed, not asserted: ``pytest tests/serve/test_load.py -rP`` shows them. Beyond its
limits the proxy answers 429 with ``Retry-After`` at once, and every admitted request
still gets its answer.

The proxy, the upstream and the clients share one process (and its GIL), so the figures
are a bound on what the proxy adds, not its throughput on a machine of its own.
"""

from __future__ import annotations

import asyncio
import gc
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from fusion_graph.serve import ServeLimits
from tests.faults.fake_openai import COMPLETION_TOKENS, PROMPT_TOKENS, FakeOpenAI, Fault
from tests.serve.conftest import FAKE_MODEL, Serve, fake_spec

pytestmark = pytest.mark.server

REQUESTS = 500
CONCURRENCY = 64
N = 4
LATENCY_S = 0.1
"""The upstream's time to answer each request."""
IDEAL_S = 2 * LATENCY_S
"""One ``fusion-N`` answer with ``n`` honoured: the candidates' request, then the fusor's."""
RSS_BOUND_MB = 50
"""How much the process's resident memory may grow over the run (after a warm-up round)."""


def every(_: Any) -> bool:
    return True


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {i}: what is six times seven?"}]


def rss_mb() -> float:
    """This process's resident set size now, in MB (Linux: ``/proc/self/status``)."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc/self/status on this system")
    found = re.search(r"^VmRSS:\s+(\d+) kB", status.read_text(), re.MULTILINE)
    assert found is not None
    return int(found[1]) / 1024


def percentile(seconds: list[float], q: float) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def post_all(
    url: str, questions: range, *, concurrency: int
) -> list[tuple[int, httpx.Response, float]]:
    """POST ``fusion-N/fake`` for every question, ``concurrency`` at a time: ``(question,
    response, seconds)`` per request, in completion order."""
    pending = list(questions)
    done: list[tuple[int, httpx.Response, float]] = []
    limits = httpx.Limits(
        max_connections=concurrency,
        max_keepalive_connections=concurrency,
        # Below uvicorn's 5 s keep-alive timeout: a connection the client reuses just as the
        # server closes it for idleness is a ReadError (httpx's default expiry is 5 s too).
        keepalive_expiry=1.0,
    )
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker() -> None:
            while pending:
                i = pending.pop(0)
                body = {"model": f"fusion-{N}/{FAKE_MODEL}", "messages": question(i)}
                start = time.perf_counter()
                response = await client.post(f"{url}/chat/completions", json=body)
                done.append((i, response, time.perf_counter() - start))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def assert_well_formed(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == f"fusion-{N}/{FAKE_MODEL}"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "The fused answer is 42."}
    assert choice["finish_reason"] == "stop"
    # One n=N request for the candidates and one fusor request, as billed by the upstream.
    assert body["usage"] == {
        "prompt_tokens": 2 * PROMPT_TOKENS,
        "completion_tokens": (N + 1) * COMPLETION_TOKENS,
        "total_tokens": 2 * PROMPT_TOKENS + (N + 1) * COMPLETION_TOKENS,
    }
    assert [c["status"] for c in body["fusion_graph"]["candidates"]] == ["ok"] * N


def test_500_requests_64_at_a_time_none_lost_none_twice(
    prompt_fake: FakeOpenAI, serve: Serve
) -> None:
    proxy = serve(fake_spec(prompt_fake), limits=ServeLimits(max_in_flight=CONCURRENCY))
    prompt_fake.configure(rules=[(every, Fault.slow_first_byte(LATENCY_S))])
    # A warm-up round: the first requests build clients, pools and caches, which stay.
    warm_up = asyncio.run(post_all(proxy.base_url, range(-CONCURRENCY, 0), concurrency=64))
    assert {r.status_code for _, r, _ in warm_up} == {200}
    prompt_fake.configure(rules=[(every, Fault.slow_first_byte(LATENCY_S))])
    gc.collect()
    rss_before = rss_mb()

    started = time.perf_counter()
    done = asyncio.run(post_all(proxy.base_url, range(REQUESTS), concurrency=CONCURRENCY))
    wall = time.perf_counter() - started

    gc.collect()
    rss_after = rss_mb()
    assert sorted(i for i, _, _ in done) == list(range(REQUESTS))
    for _, response, _ in done:
        assert_well_formed(response)
    assert len({r.json()["id"] for _, r, _ in done}) == REQUESTS
    # At the upstream: exactly one candidates' request (n=N, a seed) and one fusor request
    # (no seed, the candidates in its prompt) per question; nothing retried, nothing lost.
    assert prompt_fake.wait_idle()
    requests = prompt_fake.requests
    assert len(requests) == 2 * REQUESTS
    assert set(prompt_fake.outcomes) == {"ok"}
    candidates = [r for r in requests if r.seed is not None]
    fusors = [r for r in requests if r.seed is None]
    assert {r.n for r in candidates} == {N} and {r.n for r in fusors} == {1}
    asked = Counter(re.findall(r"Question (\d+):", r.prompt)[0] for r in candidates)
    fused = Counter(re.findall(r"Question (\d+):", r.prompt)[0] for r in fusors)
    expected = Counter(str(i) for i in range(REQUESTS))
    assert asked == expected
    assert fused == expected
    assert prompt_fake.peak_in_flight <= CONCURRENCY
    assert rss_after - rss_before < RSS_BOUND_MB, (
        f"RSS grew by {rss_after - rss_before:.0f} MB over {REQUESTS} requests"
    )

    seconds = [s for _, _, s in done]
    p50, p99 = statistics.median(seconds), percentile(seconds, 0.99)
    print(
        f"\n{REQUESTS} x fusion-{N}, {CONCURRENCY} concurrent, upstream {LATENCY_S * 1000:.0f} ms"
        f" per request (ideal {IDEAL_S * 1000:.0f} ms per answer):\n"
        f"  p50 {p50 * 1000:.0f} ms ({p50 / IDEAL_S:.2f}x ideal), "
        f"p99 {p99 * 1000:.0f} ms ({p99 / IDEAL_S:.2f}x ideal), max {max(seconds) * 1000:.0f} ms\n"
        f"  wall {wall:.1f} s ({REQUESTS / wall:.0f} requests/s; ideal "
        f"{REQUESTS / CONCURRENCY * IDEAL_S:.1f} s), RSS {rss_before:.0f} -> {rss_after:.0f} MB"
    )


def test_beyond_the_limits_429_at_once_and_the_admitted_all_answered(
    prompt_fake: FakeOpenAI, serve: Serve
) -> None:
    in_flight, queue, clients = 8, 8, 64
    limits = ServeLimits(max_in_flight=in_flight, max_queue=queue, retry_after_s=2)
    proxy = serve(fake_spec(prompt_fake), limits=limits)
    # The upstream holds every request until released: the first 8 requests stay in flight
    # and the next 8 in the queue for as long as the test wants.
    prompt_fake.configure(rules=[(every, Fault.slow_first_byte(30))])

    async def run() -> list[httpx.Response]:
        out: list[httpx.Response] = []
        limits = httpx.Limits(max_connections=clients, keepalive_expiry=1.0)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:

            async def one(i: int) -> None:
                body = {"model": f"fusion-{N}/{FAKE_MODEL}", "messages": question(i)}
                out.append(await client.post(f"{proxy.base_url}/chat/completions", json=body))

            tasks = [asyncio.ensure_future(one(i)) for i in range(clients)]
            deadline = time.monotonic() + 20
            # The refused answer at once; the admitted reach the upstream and stay there.
            while len(out) < clients - in_flight - queue or prompt_fake.in_flight < in_flight:
                assert time.monotonic() < deadline, (
                    f"{len(out)} answers, {prompt_fake.in_flight} at the upstream"
                )
                await asyncio.sleep(0.01)
            assert {r.status_code for r in out} == {429}
            assert prompt_fake.in_flight == in_flight
            health = (await client.get(f"{proxy.url}/health")).json()
            assert (health["in_flight"], health["waiting"]) == (in_flight, queue)
            prompt_fake.hurry()
            await asyncio.gather(*tasks)
        return out

    out = asyncio.run(run())
    assert len(out) == clients
    refused = [r for r in out if r.status_code == 429]
    answered = [r for r in out if r.status_code != 429]
    assert len(refused) == clients - in_flight - queue
    for response in refused:
        assert response.headers["retry-after"] == "2"
        assert response.json()["error"]["code"] == "overloaded"
    assert len(answered) == in_flight + queue
    for response in answered:
        assert_well_formed(response)
    assert prompt_fake.wait_idle()
    assert prompt_fake.received == 2 * len(answered)  # the refused never reached it
    assert httpx.get(f"{proxy.url}/health").json()["in_flight"] == 0
