"""The sync API in a forked child (``multiprocessing``'s default start method on Linux before
Python 3.14): the child has the parent's background loop and thread pool, but none of their
threads, so it must start its own."""

from __future__ import annotations

import multiprocessing

from fusion_graph import fusion_of_n
from fusion_graph.testing import FakeChatModel


def fused_answer(question: str) -> str:
    step = fusion_of_n(FakeChatModel(replies=["a", "b"]), n=4, fusor=FakeChatModel(replies=["f"]))
    return str(step.invoke(question).content)


def test_a_forked_child_runs_the_sync_api_after_its_parent_did() -> None:
    assert fused_answer("in the parent") == "f"  # the loop and the pool threads exist now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        answer = pool.apply_async(fused_answer, ("in the child",))
        assert answer.get(timeout=30) == "f"
