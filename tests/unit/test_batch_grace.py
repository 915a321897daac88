"""The batch jobs' straggler cut-off: a stalled teacher does not hold a prompt's row."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fusion_graph.batch import CandidateStore
from fusion_graph.batch.models import JobStats
from fusion_graph.batch.pool import Pool
from fusion_graph.testing import CallRecorder, FakeChatModel
from tests.unit.test_batch import by_seed, handle, item


def test_a_stalled_teacher_is_cut_after_the_grace_window_and_asked_again_next_run(
    tmp_path: Path,
) -> None:
    fast = FakeChatModel(replies=by_seed("fast"))
    stalled_recorder = CallRecorder()
    stalled = FakeChatModel(replies=["late"], delay=30.0, recorder=stalled_recorder)
    question = item("q")
    with CandidateStore(tmp_path / "s.sqlite") as db:
        handles = [handle(fast, name="fast"), handle(stalled, name="stalled")]
        cset = asyncio.run(Pool(handles, db, JobStats(), grace=0.05).candidates(question, 2))
        assert [c.status for c in cset.candidates] == ["ok", "cancelled"]
        assert cset.candidates[1].stopped == "grace"
        end = time.monotonic() + 5
        while not stalled_recorder.cancelled and time.monotonic() < end:
            time.sleep(0.01)
        assert len(stalled_recorder.cancelled) == 1  # the call was stopped, not left running

        # The cut answer was not recorded: the next run asks that teacher again.
        recovered = FakeChatModel(replies=["on time"])
        handles = [handle(fast, name="fast"), handle(recovered, name="stalled")]
        again = asyncio.run(Pool(handles, db, JobStats(), grace=0.05).candidates(question, 2))
    assert [c.text for c in again.candidates] == ["fast 0", "on time"]
    assert again.replayed == frozenset({0})
