"""What the proxy costs: ``fusion-graph serve`` against calling the upstream directly.

python -m benchmarks.serve [--repeats 50] [--latency 0.1]

The upstream is the loopback fake OpenAI-compatible server of ``tests/faults`` (answers at
once, or after ``--latency`` seconds for the streaming figures); the proxy runs with uvicorn
in a thread of this process, as the tests run it. Figures are medians (and p99) over
``--repeats`` sequential requests with the ``openai`` client, after a warm-up:

* ``direct``: the client calls the fake upstream (N=1);
* ``pass-through``: the client calls the proxy with the plain model name (one upstream call);
* ``fusion-N proxy`` vs ``fusion-N in-process``: ``fusion-N/fake`` through the proxy, and
  ``fusion_of_n(openai_compatible(fake), n=N)`` called in this process (``arun``);
* ``first byte`` / ``first token`` / ``total`` of a streamed ``fusion-4`` answer with an
  upstream that takes ``--latency`` s per request (candidates, then the fusor).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import httpx
import openai

from fusion_graph import fusion_of_n
from fusion_graph.integrations.openai_compat import openai_compatible
from fusion_graph.serve import ServeLimits, create_app
from tests.faults.fake_openai import FakeOpenAI, Fault
from tests.serve.conftest import start_proxy

QUESTION = [{"role": "user", "content": "What is six times seven?"}]


def timed(call: Callable[[], object], repeats: int) -> list[float]:
    call()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def line(name: str, seconds: list[float]) -> str:
    p50 = statistics.median(seconds) * 1000
    p99 = sorted(seconds)[max(0, int(len(seconds) * 0.99) - 1)] * 1000
    return f"{name:<24} p50 {p50:8.2f} ms   p99 {p99:8.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    with FakeOpenAI() as fake:
        proxy = start_proxy(create_app(f"openai:{fake.base_url}:fake", limits=ServeLimits()))
        try:
            direct = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
            client = proxy.client()

            def ask(c: openai.OpenAI, model: str) -> Callable[[], object]:
                return lambda: c.chat.completions.create(model=model, messages=QUESTION)

            d = timed(ask(direct, "fake"), args.repeats)
            p = timed(ask(client, "fake"), args.repeats)
            print(line("direct (N=1)", d))
            print(line("pass-through (N=1)", p))
            overhead = (statistics.median(p) - statistics.median(d)) * 1000
            print(f"{'pass-through overhead':<24} p50 {overhead:8.2f} ms")
            for n in (4, 16):
                llm = openai_compatible(fake.base_url, "fake", max_retries=0)
                fused = fusion_of_n(llm, n=n, fusor=llm)
                with asyncio.Runner() as runner:
                    run = fused.arun
                    inproc = timed(lambda run=run: runner.run(run(QUESTION)), args.repeats)
                print(
                    line(f"fusion-{n} proxy", timed(ask(client, f"fusion-{n}/fake"), args.repeats))
                )
                print(line(f"fusion-{n} in-process", inproc))
            fake.configure(rules=[(lambda _: True, Fault.slow_first_byte(args.latency))])
            firsts, tokens, totals = [], [], []
            body = {"model": "fusion-4/fake", "messages": QUESTION, "stream": True}
            for _ in range(max(3, args.repeats // 10)):
                start = time.perf_counter()
                first = token = None
                with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=body) as r:
                    for text in r.iter_lines():
                        now = time.perf_counter() - start
                        first = first if first is not None else now
                        if token is None and '"content"' in text:
                            token = now
                firsts.append(first or 0.0)
                tokens.append(token or 0.0)
                totals.append(time.perf_counter() - start)
            print(f"streamed fusion-4, upstream {args.latency * 1000:.0f} ms per request:")
            print(line("  first byte", firsts))
            print(line("  first content token", tokens))
            print(line("  whole answer", totals))
        finally:
            proxy.stop()


if __name__ == "__main__":
    main()
