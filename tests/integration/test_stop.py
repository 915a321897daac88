"""A timed-out or cancelled call stops the embedded model between tokens (so its lock is
free for the next call) instead of generating to the end in an abandoned thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from fusion_graph.integrations.llama_cpp import ChatLocalModel
from fusion_graph.runtime import Caller, CallStopped

pytestmark = pytest.mark.integration

LONG = "Write a very long, detailed story about a dragon who learns to bake bread."


@pytest.mark.parametrize("kind", ["invoke", "sample_n"])
def test_a_timeout_stops_the_local_model_between_tokens(kind: str) -> None:
    llm = ChatLocalModel(max_tokens=1500, temperature=0.8)
    llm.invoke("hi", max_tokens=2)  # loaded
    finished = threading.Event()
    outcome: dict[str, Any] = {}

    def call() -> Any:
        try:
            if kind == "invoke":
                return llm.invoke(LONG)
            return llm.sample_n(LONG, seeds=[1, 2])
        except CallStopped as exc:
            outcome["stopped"] = exc
            raise
        finally:
            finished.set()

    result = asyncio.run(Caller(sync=True, timeout=0.5).call(call, None))
    assert isinstance(result.error, TimeoutError)
    # 1500 tokens take 10-60 s here: a call that was not stopped would finish much later
    assert finished.wait(timeout=120)
    assert isinstance(outcome.get("stopped"), CallStopped)
