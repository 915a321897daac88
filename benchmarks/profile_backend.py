"""cProfile of one backend path against the fake server (see benchmarks/README.md).

python -m benchmarks.profile_backend --strategy bon:judge --n 64 --ignore-n [--sync]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats

from benchmarks.fake_server import fake_server
from benchmarks.openai_backend import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_backend")
    parser.add_argument("--strategy", default="bon:judge")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--ignore-n", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--out", default=None, help="also write the raw profile here")
    args = parser.parse_args(argv)
    with fake_server(0.1, honour_n=not args.ignore_n) as base_url:
        runnable = build(args.strategy, base_url, args.n)
        profiler = cProfile.Profile()

        async def runs() -> None:
            await runnable.ainvoke("q")  # warm-up
            profiler.enable()
            for _ in range(args.runs):
                await runnable.ainvoke("q")
            profiler.disable()

        asyncio.run(runs())
    if args.out:
        profiler.dump_stats(args.out)
    stats = pstats.Stats(profiler)
    stats.sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
