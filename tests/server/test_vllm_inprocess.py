"""ChatVLLM: vLLM's offline engine in the process, with the converted SmolLM2.

The main virtualenv has no vLLM, so the test runs this file as a script with .venv-vllm's
python (``--driver``); the script drives FusioN and BoN end to end, records what the engine
saw, and prints one JSON line that the test then checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARK = "FUSION_GRAPH_DRIVER_RESULT "
N = 4
MAX_TOKENS = 24


# ---------------------------------------------------------------------------------------------
# The driver (runs under .venv-vllm's python)
# ---------------------------------------------------------------------------------------------


def _metric_values(llm: Any) -> dict[str, float]:
    """vLLM's own counters (``LLM.get_metrics``), summed over labels we do not split on."""
    values: dict[str, float] = {}
    for metric in llm.get_metrics():
        name = metric.name
        labels = getattr(metric, "labels", {}) or {}
        if "source" in labels:
            name = f"{name}[{labels['source']}]"
        value = getattr(metric, "value", None)
        if isinstance(value, int | float):
            values[name] = values.get(name, 0.0) + float(value)
    return values


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def driver(model_dir: str) -> dict[str, Any]:
    import asyncio

    from fusion_graph import MajorityVote, best_of_n, fusion_of_n
    from fusion_graph.integrations.vllm import ChatVLLM

    started = time.perf_counter()
    llm = ChatVLLM(
        model=model_dir,
        model_name="smollm2-inprocess",
        max_tokens=MAX_TOKENS,
        temperature=0.9,
        engine_kwargs={"enforce_eager": True, "disable_log_stats": False, "dtype": "bfloat16"},
    )
    engine = llm.engine()
    load_s = time.perf_counter() - started

    # Count what reaches the engine: one LLM.chat call per request, and its n.
    calls: list[dict[str, Any]] = []
    real_chat = engine.chat

    def counting_chat(conversations: Any, params: Any, **kwargs: Any) -> Any:
        calls.append({"conversations": len(conversations), "n": params.n, "seed": params.seed})
        return real_chat(conversations, params, **kwargs)

    engine.chat = counting_chat
    block_size = int(engine.llm_engine.vllm_config.cache_config.block_size)
    facts = " ".join(f"Fact {i}: {i} squared is {i * i}." for i in range(60))
    prompt = f"[{uuid.uuid4()}] {facts} Which fact is about 7?"

    before = _metric_values(engine)
    replies = llm.sample_n(prompt, seeds=[11, 12, 13, 14])
    after = _metric_values(engine)
    sample = {
        "calls": list(calls),
        "texts": [r.content if not isinstance(r, Exception) else repr(r) for r in replies],
        "usage": [r.usage_metadata if not isinstance(r, Exception) else None for r in replies],
        "metadata": [
            r.response_metadata if not isinstance(r, Exception) else None for r in replies
        ],
        "metrics": _delta(before, after),
    }

    calls.clear()
    fused = fusion_of_n(llm, n=N, fusor=llm).run("Name a primary colour.")
    fusion = {
        "calls": list(calls),
        "ok": [c.ok for c in fused.candidates],
        "texts": [c.text for c in fused.candidates],
        "answer": fused.message.content,
        "input_tokens": [c.usage.input_tokens if c.usage else None for c in fused.candidates],
    }

    calls.clear()
    best = best_of_n(llm, n=N, selector=MajorityVote())
    result = asyncio.run(best.arun("What is 2 + 2? Answer with a number."))
    bon = {
        "calls": list(calls),
        "ok": [c.ok for c in result.candidates],
        "selected": result.decision.selected_index,
        "answer": result.message.content,
    }
    return {
        "load_s": load_s,
        "block_size": block_size,
        "sample": sample,
        "fusion": fusion,
        "bon": bon,
        "total_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------
# The test (runs under the main virtualenv)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inprocess(vllm_python: Path, smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("vllm-inprocess") / "driver.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    with log.open("w") as out:
        done = subprocess.run(
            [str(vllm_python), str(Path(__file__).resolve()), "--driver", str(smollm2_hf)],
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=600,
            check=False,
        )
    lines = [x for x in done.stdout.splitlines() if x.startswith(MARK)]
    if done.returncode != 0 or not lines:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        pytest.fail(f"the in-process vLLM driver failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1][len(MARK) :])


@pytest.mark.server
def test_sample_n_is_one_engine_request_with_n(inprocess: Any) -> None:
    sample = inprocess["sample"]
    assert sample["calls"] == [{"conversations": 1, "n": N, "seed": 11}]
    assert all(not t.startswith(("RuntimeError", "ValueError")) for t in sample["texts"])
    assert len(set(sample["texts"])) >= 2, sample["texts"]  # one seed, still distinct samples
    assert [m["choice_index"] for m in sample["metadata"]] == list(range(N))
    assert {m["request_n"] for m in sample["metadata"]} == {N}


@pytest.mark.server
def test_sample_n_prefills_the_prompt_once(inprocess: Any) -> None:
    sample = inprocess["sample"]
    prompt_tokens = sample["metadata"][0]["prompt_tokens"]
    block = inprocess["block_size"]
    assert prompt_tokens > 2 * block, "the prompt must span several KV blocks"
    # Each candidate carries a 1/N share of the one prompt.
    assert sum(u["input_tokens"] for u in sample["usage"]) == prompt_tokens
    metrics = sample["metrics"]
    computed = metrics["vllm:prompt_tokens_by_source[local_compute]"]
    hits = metrics["vllm:prompt_tokens_by_source[local_cache_hit]"]
    # N samples of a P-token prompt: once in full, then only the partial last block again.
    assert computed <= prompt_tokens + (N - 1) * block, metrics
    assert hits >= (N - 1) * (prompt_tokens // block) * block, metrics


@pytest.mark.server
def test_fusion_end_to_end_in_process(inprocess: Any) -> None:
    fusion = inprocess["fusion"]
    assert fusion["ok"] == [True] * N
    assert fusion["answer"], "the fusor wrote nothing"
    # Candidates: one request with n=N; then the fusor's own request.
    assert [c["n"] for c in fusion["calls"]] == [N, 1]


@pytest.mark.server
def test_best_of_n_end_to_end_in_process_async(inprocess: Any) -> None:
    bon = inprocess["bon"]
    assert bon["ok"] == [True] * N
    assert bon["selected"] in range(N)
    assert bon["answer"]
    assert [c["n"] for c in bon["calls"]] == [N]  # majority vote needs no model call


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--driver":
        print(MARK + json.dumps(driver(sys.argv[2]), default=str), flush=True)
    else:
        sys.exit("usage: python tests/server/test_vllm_inprocess.py --driver MODEL_DIR")
