"""What the proxy costs: ``fusion-graph serve`` against calling the upstream directly.

python -m benchmarks.serve [--repeats 50] [--latency 0.1]

The upstream is the loopback fake OpenAI-compatible server of ``tests/faults`` (``FakeOpenAI``,
Nagle's algorithm off: with it on, every answer of the stdlib server waits ~40 ms for a
delayed ACK, which swamps what is measured here); it answers at once, or after
``--latency`` seconds for the streaming figures. The proxy runs with uvicorn in a thread of
this process, as the tests run it. Figures are medians (and p99) over ``--repeats``
sequential requests with the ``openai`` client, after a warm-up:

* ``direct``: the client calls the fake upstream (N=1), whole and streamed;
* ``pass-through``: the client calls the proxy with the plain model name (one upstream call),
  whole and streamed: forwarded raw (what ``openai:`` / ``vllm:`` upstreams do), and through
  the LangChain chat model (what the embedded model and chat-model upstreams do), measured
  together, taking turns with the direct calls;
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
from fusion_graph.serve import ServeLimits, Upstream, create_app
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


def timed_together(calls: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Like :func:`timed` for each call, taking turns, so that a busy moment of the machine
    falls on all of them alike (their difference is the figure that matters)."""
    for call in calls:
        call()
    seconds: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, out in zip(calls, seconds, strict=True):
            start = time.perf_counter()
            call()
            out.append(time.perf_counter() - start)
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
        spec = f"openai:{fake.base_url}:fake"
        proxy = start_proxy(create_app(spec, limits=ServeLimits()))
        through_langchain = Upstream.from_spec(spec)
        through_langchain.forwarder = None  # pass-through by the chat model, as for `local`
        langchain_proxy = start_proxy(create_app(through_langchain, limits=ServeLimits()))
        try:
            direct = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
            client = proxy.client()
            langchain_client = langchain_proxy.client()

            def ask(c: openai.OpenAI, model: str) -> Callable[[], object]:
                return lambda: c.chat.completions.create(model=model, messages=QUESTION)

            def ask_streamed(c: openai.OpenAI, model: str) -> Callable[[], object]:
                def call() -> object:
                    stream = c.chat.completions.create(model=model, messages=QUESTION, stream=True)
                    return [chunk for chunk in stream]

                return call

            d, p, lc, ds, ps, lcs = timed_together(
                [
                    ask(direct, "fake"),
                    ask(client, "fake"),
                    ask(langchain_client, "fake"),
                    ask_streamed(direct, "fake"),
                    ask_streamed(client, "fake"),
                    ask_streamed(langchain_client, "fake"),
                ],
                args.repeats,
            )
            rows = [
                ("direct (N=1)", d, None),
                ("pass-through, raw", p, d),
                ("pass-through, LangChain", lc, d),
                ("direct, streamed", ds, None),
                ("streamed, raw", ps, ds),
                ("streamed, LangChain", lcs, ds),
            ]
            for name, seconds, baseline in rows:
                extra = ""
                if baseline is not None:
                    overhead = (statistics.median(seconds) - statistics.median(baseline)) * 1000
                    extra = f"   overhead p50 {overhead:6.2f} ms"
                print(line(name, seconds) + extra)
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
            langchain_proxy.stop()


if __name__ == "__main__":
    main()
