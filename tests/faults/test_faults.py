"""Fault injection: ``fusion_of_n`` and ``best_of_n`` over ``openai_compatible`` against a
fake server on loopback (:mod:`tests.faults.fake_openai`) that fails half the requests in
one way at a time (429 with ``Retry-After``, 500, malformed JSON, a truncated body or SSE
stream, a first byte too slow for the client's timeout, a connection reset), sync and async,
with the server honouring ``n`` or ignoring it.

Every run must answer from the survivors, keep every failure as a failed candidate with its
error type, and leave no request in flight at the server (the ``fake_openai`` fixture checks
that after every test). Retries must wait at least what ``Retry-After`` says (measured at the
server), and 200 runs must not grow the process's memory.

How the candidates are made in each variant:

* **n ignored** (like llama.cpp's server): one ``n=8`` request (it gets one choice back, for
  candidate 0), then 7 fill-in requests, one per candidate seed. Odd seeds fail.
* **n honoured**: one ``n=8`` request, which fails too; the fan-out then makes every
  candidate with a call of its own (``Candidate.multi_sample_error``). The model streams
  (``streaming=True``), so those calls are SSE streams. Odd seeds fail.

The fusor is the same model; its requests carry no seed, so they never fail.

Retries run fusion-graph's own ``retry=RetryPolicy(...)`` and wait at least ``Retry-After``;
a sample that failed inside a successful multi-sample call (a fill-in request) is retried
alone; a step's ``timeout=`` ends the HTTP request too (it is passed down as the request's
timeout), so nothing is left in flight.
"""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from langgraph.types import RetryPolicy

from fusion_graph import MajorityVote, best_of_n, fusion_of_n
from fusion_graph.integrations import loop_clients
from fusion_graph.integrations.openai_compat import ChatOpenAICompatible, openai_compatible
from fusion_graph.types import Candidate, FusionResult
from tests.conftest import Mode
from tests.faults.fake_openai import (
    FakeOpenAI,
    Fault,
    Request,
    all_of,
    any_of,
    candidate,
    first_attempt,
    multi_sample,
    odd_seed,
    reply_text,
)

N = 8
SEED = 100
"""Candidate ``i`` has seed ``SEED + i``: candidates 1, 3, 5 and 7 have odd seeds."""
SURVIVORS = [0, 2, 4, 6]
RETRY_AFTER_S = 1.0
TIMEOUT_S = 30.0
"""The client's timeout per request, except where the first byte is meant to be too slow."""
SLOW_TIMEOUT_S = 1.0
"""The client's timeout against the slow first byte (which comes after 30 s)."""
QUESTION = "What is 6 x 7?"

pytestmark = pytest.mark.faults

FAULTS: dict[str, Fault] = {
    "429": Fault.too_many_requests(RETRY_AFTER_S),
    "500": Fault.status(500),
    "malformed_json": Fault.malformed_json(),
    "truncated": Fault.truncated(),
    "slow_first_byte": Fault.slow_first_byte(30.0),
    "reset": Fault.connection_reset(),
}
ERROR_TYPES: dict[str, str] = {
    # What a failed candidate records (langchain-openai's error classes, the same for a
    # plain response and an SSE stream).
    "429": "OpenAIRateLimitError",
    "500": "OpenAIAPIError",  # an openai.InternalServerError
    "malformed_json": "JSONDecodeError",
    "truncated": "OpenAIConnectionError",
    "slow_first_byte": "OpenAITimeoutError",
    "reset": "OpenAIConnectionError",
}


def chat_model(server: FakeOpenAI, *, timeout: float = TIMEOUT_S, **kwargs: Any) -> Any:
    """The model under test: no retries of the OpenAI client's own unless asked."""
    options: dict[str, Any] = {"max_retries": 0, "timeout": timeout, **kwargs}
    return openai_compatible(server.base_url, "fake", **options)


def make_step(strategy: str, llm: ChatOpenAICompatible, **options: Any) -> Any:
    if strategy == "fusion":
        return fusion_of_n(llm, n=N, fusor=llm, seed=SEED, **options)
    return best_of_n(llm, n=N, selector=MajorityVote(), seed=SEED, **options)


def seeds_of(requests: list[Request], *, n: int = 1) -> list[int]:
    return sorted(r.seed for r in requests if r.n == n and r.seed is not None)


def expected_text(c: Candidate) -> str:
    """What the server answered for candidate ``c``: choice ``choice_index`` of the request
    with ``seed`` (an ``n=8`` request's choices share its seed), else choice 0 of its own."""
    meta = c.message.response_metadata if c.message is not None else {}
    return reply_text(meta.get("seed", c.seed), meta.get("choice_index", 0))


def check_answered_by_survivors(
    result: FusionResult, strategy: str, server: FakeOpenAI, survivors: list[int]
) -> None:
    """The run's answer comes from the candidates that succeeded, and only from them."""
    ok = [c for c in result.candidates if c.ok]
    assert [c.index for c in ok] == survivors
    assert len({c.text for c in ok}) == len(ok)  # each a reply of its own
    for c in ok:
        assert c.text == expected_text(c)
    if strategy == "fusion":
        assert result.decision.fused and not result.decision.fallback
        assert result.message.content == reply_text(None, 0)
        [fusor] = [r for r in server.requests if r.seed is None]
        for c in result.candidates:
            if c.ok:
                assert c.text in fusor.prompt
            else:  # nothing of a failed candidate (e.g. half a truncated stream) is fused
                assert f"seed {c.seed}," not in fusor.prompt
    else:
        assert result.decision.method == "majority_vote" and not result.decision.fallback
        assert result.decision.selected_index == survivors[0]
        assert result.message.content == ok[0].text


def check_failed(candidates: list[Candidate], error_type: str) -> None:
    for c in candidates:
        if c.ok:
            continue
        assert c.seed is not None and c.seed % 2 == 1, c
        assert c.error is not None and c.error.type == error_type, c.error
        assert c.message is None and c.text == ""


# ---------------------------------------------------------------------------------------------
# Half the requests fail
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fusion", "best_of_n"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_n_ignored_half_the_requests_fail(
    fake_openai: FakeOpenAI, mode: Mode, fault: str, strategy: str
) -> None:
    fake_openai.configure(honour_n=False, rules=[(odd_seed, FAULTS[fault])])
    timeout = SLOW_TIMEOUT_S if fault == "slow_first_byte" else TIMEOUT_S
    result = mode.run(make_step(strategy, chat_model(fake_openai, timeout=timeout)), QUESTION)

    check_answered_by_survivors(result, strategy, fake_openai, SURVIVORS)
    check_failed(result.candidates, ERROR_TYPES[fault])
    assert all(c.multi_sample_error is None and c.attempts == 1 for c in result.candidates)
    requests = fake_openai.requests
    assert seeds_of(requests, n=N) == [SEED]  # candidate 0 came from the ignored n=8 request
    assert seeds_of(requests) == list(range(SEED + 1, SEED + N))  # one fill-in per candidate
    assert len(requests) == N + (strategy == "fusion")
    assert sorted(f for f in fake_openai.faults if f) == [FAULTS[fault].name] * 4
    assert fake_openai.wait_idle(), "a request was left in flight"


@pytest.mark.parametrize("strategy", ["fusion", "best_of_n"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_n_honoured_half_the_requests_fail(
    fake_openai: FakeOpenAI, mode: Mode, fault: str, strategy: str
) -> None:
    fake_openai.configure(honour_n=True, rules=[(any_of(multi_sample, odd_seed), FAULTS[fault])])
    timeout = SLOW_TIMEOUT_S if fault == "slow_first_byte" else TIMEOUT_S
    llm = chat_model(fake_openai, timeout=timeout, streaming=True)
    result = mode.run(make_step(strategy, llm), QUESTION)

    check_answered_by_survivors(result, strategy, fake_openai, SURVIVORS)
    check_failed(result.candidates, ERROR_TYPES[fault])
    for c in result.candidates:  # the n=8 request failed: every candidate was made alone
        assert c.multi_sample_error is not None
        assert c.multi_sample_error.type == ERROR_TYPES[fault]
        assert c.attempts == 2
    requests = fake_openai.requests
    [group] = [r for r in requests if r.n == N]
    assert group.seed == SEED and not group.stream
    singles = [r for r in requests if r.n == 1 and r.seed is not None]
    assert sorted(r.seed for r in singles if r.seed is not None) == list(range(SEED, SEED + N))
    assert all(r.stream for r in singles)
    assert len(requests) == 1 + N + (strategy == "fusion")
    assert sorted(f for f in fake_openai.faults if f) == [FAULTS[fault].name] * 5
    assert fake_openai.wait_idle(), "a request was left in flight"


@pytest.mark.parametrize("strategy", ["fusion", "best_of_n"])
def test_a_failed_multi_sample_request_falls_back_to_one_request_per_candidate(
    fake_openai: FakeOpenAI, mode: Mode, strategy: str
) -> None:
    fake_openai.configure(honour_n=True, rules=[(multi_sample, Fault.status(500))])
    result = mode.run(make_step(strategy, chat_model(fake_openai)), QUESTION)

    check_answered_by_survivors(result, strategy, fake_openai, list(range(N)))
    for c in result.candidates:
        assert c.multi_sample_error is not None
        assert c.multi_sample_error.type == "OpenAIAPIError"
        assert "500" in c.multi_sample_error.message
        assert c.attempts == 2  # the group's request, then its own (an invoke, not sample_n)
        assert c.message is not None and "request_n" not in c.message.response_metadata
    requests = fake_openai.requests
    assert [(r.n, r.seed) for r in requests if r.n > 1] == [(N, SEED)]
    assert seeds_of(requests) == list(range(SEED, SEED + N))
    assert fake_openai.faults.count("500") == 1
    assert fake_openai.wait_idle()


class RequestLeftInFlight(AssertionError):
    """The run returned while a request of it was still in flight at the server."""


@pytest.mark.parametrize("strategy", ["fusion", "best_of_n"])
def test_a_candidate_timed_out_by_the_step_leaves_no_request_in_flight(
    fake_openai: FakeOpenAI, mode: Mode, strategy: str, request: pytest.FixtureRequest
) -> None:
    # The step's timeout (0.5 s) is far below the client's (30 s) and the slow first byte's
    # delay (20 s): a timed-out request is still in flight unless the call was really stopped.
    fake_openai.configure(honour_n=True, rules=[(odd_seed, Fault.slow_first_byte(20.0))])
    llm = chat_model(fake_openai)
    pool = [llm] * N  # every candidate a call of its own, timed out on its own
    if strategy == "fusion":
        step = fusion_of_n(pool, n=N, fusor=llm, seed=SEED, timeout=0.5)
    else:
        step = best_of_n(pool, n=N, selector=MajorityVote(), seed=SEED, timeout=0.5)
    result = mode.run(step, QUESTION)

    check_answered_by_survivors(result, strategy, fake_openai, SURVIVORS)
    check_failed(result.candidates, "TimeoutError")
    # The server notices a closed connection within ~10 ms; 2 s is ample, 20 s is a leak.
    if not fake_openai.wait_idle(2.0):
        left = fake_openai.in_flight
        fake_openai.hurry()  # end them now rather than in 20 s
        fake_openai.wait_idle()
        msg = f"{left} timed-out request(s) still in flight after the run"
        raise RequestLeftInFlight(msg)


# ---------------------------------------------------------------------------------------------
# Retry-After
# ---------------------------------------------------------------------------------------------


class RetryAfterNotHonoured(AssertionError):
    """A retry came sooner than the server's Retry-After."""


class FillInsNotRetried(AssertionError):
    """Candidates whose fill-in request failed inside a multi-sample call were not retried."""


def check_retry_gaps(server: FakeOpenAI, *, at_least_s: float, groups: int) -> None:
    """Every request was tried twice (429, then answered), the second time no sooner than
    ``at_least_s`` after the first."""
    attempts = server.attempts(lambda r: (r.seed, r.n))
    tried = {key: reqs for key, reqs in attempts.items() if key[0] is not None}
    assert len(tried) == groups, tried.keys()
    gaps = {}
    for key, reqs in tried.items():
        assert [r.attempt for r in reqs] == [1, 2], (key, reqs)
        gaps[key] = reqs[1].received_at - reqs[0].received_at
    early = {key: round(gap, 3) for key, gap in gaps.items() if gap < at_least_s}
    if early:
        msg = f"retried sooner than Retry-After ({at_least_s:g} s): {early}"
        raise RetryAfterNotHonoured(msg)


RETRY = RetryPolicy(max_attempts=3, initial_interval=0.01, backoff_factor=1.0, jitter=False)
"""Backoff far below Retry-After: a retry that waits less did not honour it."""


def test_retry_policy_waits_retry_after_for_the_multi_sample_request(
    fake_openai: FakeOpenAI, mode: Mode
) -> None:
    rule = all_of(candidate, first_attempt)
    fake_openai.configure(honour_n=True, rules=[(rule, Fault.too_many_requests(RETRY_AFTER_S))])
    result = mode.run(make_step("fusion", chat_model(fake_openai), retry=RETRY), QUESTION)

    check_answered_by_survivors(result, "fusion", fake_openai, list(range(N)))
    assert all(c.attempts == 2 and c.multi_sample_error is None for c in result.candidates)
    assert [r.n for r in fake_openai.requests if r.seed is not None] == [N, N]
    check_retry_gaps(fake_openai, at_least_s=RETRY_AFTER_S, groups=1)


def test_retry_policy_waits_retry_after_for_calls_of_their_own(
    fake_openai: FakeOpenAI, mode: Mode
) -> None:
    # A pool of N slots: every candidate is a call of its own, retried by the policy.
    rule = all_of(candidate, first_attempt)
    fake_openai.configure(honour_n=True, rules=[(rule, Fault.too_many_requests(RETRY_AFTER_S))])
    llm = chat_model(fake_openai)
    step = fusion_of_n([llm] * N, n=N, fusor=llm, seed=SEED, retry=RETRY)
    result = mode.run(step, QUESTION)

    check_answered_by_survivors(result, "fusion", fake_openai, list(range(N)))
    assert all(c.attempts == 2 for c in result.candidates)
    check_retry_gaps(fake_openai, at_least_s=RETRY_AFTER_S, groups=N)


def test_retry_policy_waits_retry_after_for_fill_in_requests(
    fake_openai: FakeOpenAI, mode: Mode
) -> None:
    rule = all_of(candidate, first_attempt)
    fake_openai.configure(honour_n=False, rules=[(rule, Fault.too_many_requests(RETRY_AFTER_S))])
    result = mode.run(make_step("fusion", chat_model(fake_openai), retry=RETRY), QUESTION)

    failed = [c for c in result.candidates if not c.ok]
    if failed:
        msg = f"{len(failed)} candidates failed without a retry: {[c.error for c in failed]}"
        raise FillInsNotRetried(msg)
    check_answered_by_survivors(result, "fusion", fake_openai, list(range(N)))
    check_retry_gaps(fake_openai, at_least_s=RETRY_AFTER_S, groups=N)


@pytest.mark.parametrize("honour_n", [True, False], ids=["n-honoured", "n-ignored"])
def test_the_openai_clients_own_retries_wait_retry_after(
    fake_openai: FakeOpenAI, mode: Mode, honour_n: bool
) -> None:
    rule = all_of(candidate, first_attempt)
    fake_openai.configure(honour_n=honour_n, rules=[(rule, Fault.too_many_requests(RETRY_AFTER_S))])
    llm = chat_model(fake_openai, max_retries=1)  # retried inside the request, no policy
    result = mode.run(make_step("fusion", llm), QUESTION)

    check_answered_by_survivors(result, "fusion", fake_openai, list(range(N)))
    assert all(c.attempts == 1 for c in result.candidates)  # one call, retried by the client
    check_retry_gaps(fake_openai, at_least_s=RETRY_AFTER_S, groups=1 if honour_n else N)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident memory now (``/proc/self/statm``), in MB."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * resource.getpagesize() / 2**20


RUNS = 200
WARM_UP = 30
MAX_GROWTH_MB = 20.0


def measure_growth(sync: bool) -> dict[str, Any]:
    """RSS growth over RUNS runs after WARM_UP runs, in this process (run it in a fresh one:
    a long test session's fragmented heap grows RSS on its own)."""
    mode = Mode("sync" if sync else "async")
    with FakeOpenAI() as server:
        # Half of every run's requests fail (their exceptions and tracebacks are kept on the
        # candidates), every async run has an event loop (and so a client) of its own.
        llm = chat_model(server)
        step = make_step("fusion", llm)
        rules = [(odd_seed, Fault.status(500))]

        def runs(count: int) -> None:
            for _ in range(count):
                server.configure(honour_n=False, rules=rules)  # the server's records too
                result = mode.run(step, QUESTION)
                assert [c.index for c in result.candidates if c.ok] == SURVIVORS
                assert server.wait_idle()

        # RSS takes a one-time step in the first few hundred runs (the allocator's arenas
        # and thread stacks settling, the same after 100 or 400 runs), so growth is
        # measured over a second batch of RUNS: a leak grows it, a settled heap does not.
        runs(WARM_UP + RUNS)
        gc.collect()
        before, twins = rss_mb(), len(loop_clients.LOOPS)
        runs(RUNS)
        gc.collect()
        return {
            "growth_mb": rss_mb() - before,
            "twins_kept": len(loop_clients.LOOPS) - twins,
            "open_connections": server.open_connections,
        }


def test_memory_does_not_grow_over_200_runs(mode: Mode) -> None:
    code = (
        "import json, tests.faults.test_faults as t; "
        f"print(json.dumps(t.measure_growth({mode.sync!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    growth = found["growth_mb"]
    assert growth < MAX_GROWTH_MB, f"RSS grew {growth:.1f} MB over {RUNS} runs"
    assert found["twins_kept"] <= 0  # no event loop (nor its client) kept
    assert found["open_connections"] <= 2 * N  # closed with their loops, or pooled


# ---------------------------------------------------------------------------------------------
# The server itself
# ---------------------------------------------------------------------------------------------


def test_the_fake_counts_requests_and_in_flight(fake_openai: FakeOpenAI) -> None:
    fake_openai.configure(rules=[(lambda r: r.seed == 2, Fault.slow_first_byte(30.0))])
    llm = chat_model(fake_openai)

    async def main() -> None:
        slow = asyncio.create_task(llm.ainvoke("slow", seed=2))
        for _ in range(1000):
            if fake_openai.in_flight:
                break
            await asyncio.sleep(0.01)
        assert fake_openai.in_flight == 1 and fake_openai.received == 1
        await llm.ainvoke("fast", seed=1)
        assert fake_openai.in_flight == 1  # the slow one is still waiting for its first byte
        fake_openai.hurry()
        await slow

    asyncio.run(main())
    assert fake_openai.in_flight == 0 and fake_openai.received == 2
    assert fake_openai.peak_in_flight == 2
    assert fake_openai.outcomes == ["ok", "ok"]  # the slow first byte, then the answer
