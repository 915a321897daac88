"""``ChatOpenAICompatible`` against a fake OpenAI-compatible server on loopback: one ``n=k``
request per fan-out, usage shares, the fallback for servers that ignore or reject ``n`` (and
which 400 answers mean that), per-candidate failures, the per-endpoint bound on requests in
flight (threads, event loops, cancellation, interrupts, limits changed while callers wait, the
defaults), queue time kept out of latency, the per-event-loop clients (closed with their loop)
and the end-to-end FusioN path.

The fake server records every request body, the most requests ever in flight at once and the
connections open to it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, cast

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage
from pydantic import SecretStr

from fusion_graph import fusion_of_n
from fusion_graph.integrations import endpoint_limits, loop_clients
from fusion_graph.integrations.openai_compat import (
    ChatOpenAICompatible,
    EndpointLimiter,
    endpoint_limiter,
    forget_endpoint,
    openai_compatible,
)
from fusion_graph.integrations.openai_fanout import _rejects_n
from tests.conftest import Mode

Behaviour = Literal["honour", "ignore", "reject"]

PROMPT_TOKENS = 11
CACHED_TOKENS = 7


@dataclass
class FakeServer:
    """A chat-completions endpoint: ``honour`` answers ``n`` choices, ``ignore`` always one
    (like llama.cpp's server), ``reject`` answers ``n > 1`` with a 400."""

    behaviour: Behaviour = "honour"
    reject_param: str | None = "n"
    reject_message: str = "'n' must be 1 for this model."
    fail_seeds: dict[int, int] = field(default_factory=dict)
    """seed -> HTTP status of the error the request carrying that seed gets."""
    fail_message: str = "The engine crashed."
    length_choices: frozenset[int] = frozenset()
    """Choice indices that finish with ``length``."""
    hold_until: int | None = None
    """Hold every request until this many have been in flight at once (then 30 ms each)."""
    hold_timeout_s: float = 2.0
    """How long a request is held at most, waiting for ``hold_until``."""
    gate: threading.Event | None = None
    """When set, every request waits for this event before it is answered."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    responses: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    connections: int = 0
    """Connections open to this fake now (those opened while it was the route's)."""
    connections_opened: int = 0
    base_url: str = ""
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _reached: bool = False

    def chat(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self.requests)

    def ns(self) -> list[int | None]:
        return [body.get("n") for body in self.chat()]

    def seeds(self) -> list[int | None]:
        return [body.get("seed") for body in self.chat()]

    def reset(self) -> None:
        with self._cond:
            self.requests.clear()
            self.responses.clear()
            self.peak = self.in_flight

    def handle(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._cond:
            index = len(self.requests)
            self.requests.append(body)
            self.responses.append((0, {}))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            if self.hold_until is not None and self.in_flight >= self.hold_until:
                self._reached = True
            self._cond.notify_all()
        try:
            if self.hold_until is not None:
                with self._cond:
                    self._cond.wait_for(lambda: self._reached, timeout=self.hold_timeout_s)
                time.sleep(0.03)  # room for a request beyond the limit to arrive
            if self.gate is not None:
                self.gate.wait(5)
            status, payload = self._answer(body)
        finally:
            with self._cond:
                self.in_flight -= 1
        with self._cond:
            self.responses[index] = (status, payload)
        return status, payload

    def connected(self, delta: int) -> None:
        with self._cond:
            self.connections += delta
            self.connections_opened += max(delta, 0)

    def _answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        seed = body.get("seed")
        if seed in self.fail_seeds:
            error = {"message": self.fail_message, "type": "server_error", "param": None}
            return self.fail_seeds[seed], {"error": error}
        n = int(body.get("n", 1))
        if n > 1 and self.behaviour == "reject":
            error = {
                "message": self.reject_message,
                "type": "invalid_request_error",
                "param": self.reject_param,
            }
            return 400, {"error": error}
        k = n if self.behaviour == "honour" else 1
        choices = [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": f"answer {i} for seed {seed}" + "!" * i,
                },
                "finish_reason": "length" if i in self.length_choices else "stop",
                "logprobs": None,
            }
            for i in range(k)
        ]
        completion = 9 * k + 4
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": completion,
            "total_tokens": PROMPT_TOKENS + completion,
            "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS},
        }
        return 200, {
            "id": f"chatcmpl-{seed}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "m"),
            "choices": choices,
            "usage": usage,
        }


@dataclass
class _Route:
    """Where the shared HTTP server sends requests: the current test's fake."""

    fake: FakeServer | None = None


def _handler(route: _Route) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        fake: FakeServer | None = None

        def log_message(self, format: str, *args: Any) -> None:
            return

        def setup(self) -> None:
            super().setup()
            self.fake = route.fake
            if self.fake is not None:
                self.fake.connected(+1)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                if self.fake is not None:
                    self.fake.connected(-1)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            assert route.fake is not None
            status, payload = route.fake.handle(json.loads(raw))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture(scope="module")
def _http() -> Iterator[tuple[_Route, str]]:
    """One loopback HTTP server for the module (the OpenAI clients of a base URL are built
    once, which is most of a request's cost here)."""
    route = _Route()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(route), bind_and_activate=False)
    http.request_queue_size = 128  # a fan-out of 64 connects at once
    http.server_bind()
    http.server_activate()
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, args=(0.01,), daemon=True).start()
    yield route, f"http://127.0.0.1:{http.server_address[1]}/v1"
    http.shutdown()
    http.server_close()


@pytest.fixture
def server(_http: tuple[_Route, str]) -> Iterator[FakeServer]:
    """A fresh fake behind the shared server, with nothing remembered about the endpoint."""
    route, base_url = _http
    forget_endpoint(base_url)
    fake = route.fake = FakeServer(base_url=base_url)
    yield fake
    if fake.gate is not None:
        fake.gate.set()
    try:
        assert endpoint_limiter(base_url).in_flight == 0, "a request slot was never given back"
    finally:
        forget_endpoint(base_url)
        # A leaked slot keeps the limiter (forget drops idle ones only): drop it anyway, so
        # the next test does not hang on it.
        endpoint_limits._LIMITERS.pop(endpoint_limits.endpoint_key(base_url), None)


def model(server: FakeServer, **kwargs: Any) -> ChatOpenAICompatible:
    return openai_compatible(server.base_url, "m", max_retries=0, timeout=10, **kwargs)


def replies_of(mode: Mode, llm: ChatOpenAICompatible, seeds: list[int]) -> list[Any]:
    return mode.call(  # type: ignore[no-any-return]
        lambda: llm.sample_n("Name a colour.", seeds=seeds),
        lambda: llm.asample_n("Name a colour.", seeds=seeds),
    )


def queued(limiter: EndpointLimiter) -> int:
    """Callers waiting for a slot of ``limiter``."""
    return len(limiter._waiters)


def wait_until(condition: Any, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------
# One request with n=k
# ---------------------------------------------------------------------------------------------


def test_honoured_n_makes_every_candidate_in_one_request(server: FakeServer, mode: Mode) -> None:
    llm = model(server, max_tokens=16)
    replies = replies_of(mode, llm, [7, 8, 9, 10])

    [body] = server.chat()
    assert body["n"] == 4 and body["seed"] == 7 and body["stream"] is False
    assert body["max_tokens"] == 16 and "max_completion_tokens" not in body
    assert all(isinstance(r, AIMessage) for r in replies), replies
    assert [r.content for r in replies] == [f"answer {i} for seed 7" + "!" * i for i in range(4)]
    assert len({id(r) for r in replies}) == 4
    for index, reply in enumerate(replies):
        meta = reply.response_metadata
        assert meta["seed"] == 7  # the seed of the request that made it
        assert meta["request_n"] == 4
        assert meta["choice_index"] == index
        assert meta["usage_split"] is True
        assert isinstance(meta["latency_s"], float) and 0 < meta["latency_s"] < 5
        assert isinstance(meta["queue_s"], float) and meta["queue_s"] >= 0
        assert meta["finish_reason"] == "stop"


def test_usage_shares_add_up_to_the_response_usage(server: FakeServer) -> None:
    server.length_choices = frozenset({1})
    llm = model(server, max_tokens=5)
    replies = llm.sample_n("Name a colour.", seeds=[1, 2, 3, 4])

    [(status, response)] = server.responses
    assert status == 200
    messages = [r for r in replies if isinstance(r, AIMessage)]
    usage = [m.usage_metadata for m in messages]
    assert len(usage) == 4 and all(u is not None for u in usage)
    total = response["usage"]
    assert sum(u["input_tokens"] for u in usage if u) == total["prompt_tokens"]
    assert sum(u["output_tokens"] for u in usage if u) == total["completion_tokens"]
    assert sum(u["total_tokens"] for u in usage if u) == total["total_tokens"]
    cached = [(u.get("input_token_details") or {}).get("cache_read") for u in usage if u]
    assert sum(c or 0 for c in cached) == CACHED_TOKENS
    # Shares, not copies: every choice got about a quarter of the prompt.
    assert sorted(u["input_tokens"] for u in usage if u) == [2, 3, 3, 3]
    # A choice cut at max_tokens made exactly max_tokens; the rest split the remainder.
    assert usage[1] is not None and usage[1]["output_tokens"] == 5
    assert messages[1].response_metadata["finish_reason"] == "length"


def test_supports_n_true_trusts_the_server(server: FakeServer) -> None:
    server.behaviour = "ignore"
    replies = model(server, supports_n=True).sample_n("Hi", seeds=[1, 2, 3])

    assert server.ns() == [3]  # no extra requests
    assert isinstance(replies[0], AIMessage)
    assert all(isinstance(r, RuntimeError) and "supports_n" in str(r) for r in replies[1:])


def test_supports_n_false_sends_one_request_per_candidate(server: FakeServer) -> None:
    replies: list[Any] = model(server, supports_n=False).sample_n("Hi", seeds=[4, 5, 6])

    assert server.ns() == [None, None, None]
    assert sorted(server.seeds()) == [4, 5, 6]  # type: ignore[type-var]
    assert [r.response_metadata["seed"] for r in replies] == [4, 5, 6]
    assert [r.response_metadata["request_n"] for r in replies] == [1, 1, 1]


# ---------------------------------------------------------------------------------------------
# Servers that ignore or reject n
# ---------------------------------------------------------------------------------------------


def test_server_ignoring_n_still_yields_n_candidates(server: FakeServer, mode: Mode) -> None:
    server.behaviour = "ignore"
    llm = model(server)
    replies = replies_of(mode, llm, [10, 11, 12, 13])

    bodies = server.chat()
    assert [b.get("n") for b in bodies] == [4, None, None, None]
    assert bodies[0]["seed"] == 10
    assert sorted(b["seed"] for b in bodies[1:]) == [11, 12, 13]
    assert all(isinstance(r, AIMessage) for r in replies), replies
    assert [r.content for r in replies] == [f"answer 0 for seed {s}" for s in (10, 11, 12, 13)]
    assert [r.response_metadata["seed"] for r in replies] == [10, 11, 12, 13]
    assert [r.response_metadata["request_n"] for r in replies] == [4, 1, 1, 1]
    assert [r.response_metadata["usage_split"] for r in replies] == [True, False, False, False]
    # A fill-in's usage is its own request's.
    assert replies[1].usage_metadata["output_tokens"] == 13

    # Remembered for the endpoint and model, by any model object: no n from now on.
    server.reset()
    again = replies_of(mode, model(server), [20, 21, 22])
    assert server.ns() == [None, None, None]
    assert sorted(server.seeds()) == [20, 21, 22]  # type: ignore[type-var]
    assert all(isinstance(r, AIMessage) for r in again)

    # Until the process forgets the endpoint.
    forget_endpoint(server.base_url + "/")
    server.reset()
    replies_of(mode, llm, [30, 31])
    assert server.ns() == [2, None]


def test_separate_requests_to_a_server_without_seeds_carry_none(
    server: FakeServer, mode: Mode
) -> None:
    server.behaviour = "ignore"
    llm = model(server, supports_n=False, supports_seed=False)
    replies = replies_of(mode, llm, [1, 2, 3])
    assert all(isinstance(r, AIMessage) for r in replies), replies
    assert ["seed" in b for b in server.chat()] == [False, False, False]
    assert [b["messages"] for b in server.chat()] == [server.chat()[0]["messages"]] * 3
    assert [r.response_metadata["seed"] for r in replies] == [1, 2, 3]


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("n", "Invalid value."),
        (None, "Only n=1 is supported by this server."),
        (None, "Only one completion choice is allowed"),  # llama.cpp's server
    ],
    ids=["param", "message", "llama.cpp"],
)
def test_server_rejecting_n_gets_one_request_per_candidate(
    server: FakeServer, mode: Mode, param: str | None, message: str
) -> None:
    server.behaviour = "reject"
    server.reject_param, server.reject_message = param, message
    llm = model(server)
    replies = replies_of(mode, llm, [10, 11, 12, 13])

    bodies = server.chat()
    assert [b.get("n") for b in bodies] == [4, None, None, None, None]
    assert [status for status, _ in server.responses].count(400) == 1
    assert sorted(b["seed"] for b in bodies[1:]) == [10, 11, 12, 13]
    assert all(isinstance(r, AIMessage) for r in replies), replies
    assert [r.response_metadata["seed"] for r in replies] == [10, 11, 12, 13]
    assert [r.response_metadata["request_n"] for r in replies] == [1, 1, 1, 1]

    server.reset()
    replies_of(mode, llm, [20, 21])
    assert server.ns() == [None, None]


@pytest.mark.parametrize(
    "message",
    [
        "temperature must be at most 2.",
        "max_tokens: n/a is not a number.",  # a standalone "n" that is not the field
        "The prompt is n tokens over the limit; shorten it.",
    ],
)
def test_bad_request_not_about_n_raises_and_is_not_remembered(
    server: FakeServer, message: str
) -> None:
    server.fail_seeds = {10: 400}
    server.fail_message = message
    llm = model(server)
    with pytest.raises(openai.BadRequestError, match=message.split()[0]):
        llm.sample_n("Hi", seeds=[10, 11])
    assert server.ns() == [2]  # no fill-in requests

    server.reset()
    llm.sample_n("Hi", seeds=[20, 21])
    assert server.ns() == [2]


def _bad_request(message: str, param: str | None = None) -> openai.BadRequestError:
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    body = {"message": message, "type": "invalid_request_error", "param": param}
    response = cast(Any, httpx.Response(400, request=request))  # openai's own httpx may differ
    return openai.BadRequestError(message, response=response, body=body)


@pytest.mark.parametrize(
    "message",
    [
        "'n' must be 1 for this model.",
        'Invalid value for "n": 4.',
        "Unsupported value: 'n' does not support 4 with this model.",
        "`n` must be 1",
        "Invalid parameter: n",
        "param: n",
        "body.n: Input should be less than or equal to 1",
        "n: Input should be less than or equal to 1",
        "n must be 1 when using greedy sampling",
        "n > 1 is not supported",
        "n=4: must be 1",
        "Only n=1 is supported by this server.",
        "This endpoint only supports n=1",
        "Only one completion choice is allowed",
    ],
)
def test_a_400_naming_the_n_field_is_a_rejection_of_n(message: str) -> None:
    assert _rejects_n(_bad_request(message))


@pytest.mark.parametrize(
    "message",
    [
        "temperature must be at most 2.",
        "max_tokens: n/a is not a number.",
        "The prompt is n tokens over the limit; shorten it.",
        "Invalid 'messages[0].content': got 'line\\n', expected a non-empty string.",
        "invalid escape \\n must be doubled",
        "messages[1]: content must be a string, got an n-dimensional array",
        "model 'gpt-n' not found",
        "top_n must be positive",
        "N must be 1",  # a count, not the field
        "stop: at most 4 sequences (got n=5)",
    ],
)
def test_a_400_mentioning_the_letter_n_is_not_a_rejection_of_n(message: str) -> None:
    assert not _rejects_n(_bad_request(message))


def test_the_param_of_a_400_decides_over_its_message() -> None:
    assert _rejects_n(_bad_request("Invalid value.", param="n"))
    assert _rejects_n(_bad_request("Invalid value.", param="body.n"))
    assert not _rejects_n(_bad_request("'n' must be at most 2 here", param="temperature"))


# ---------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------


def test_failed_n_request_raises(server: FakeServer, mode: Mode) -> None:
    server.fail_seeds = {10: 500}
    with pytest.raises(openai.InternalServerError):
        replies_of(mode, model(server), [10, 11, 12])
    assert server.ns() == [3]


def test_failed_fill_in_request_fails_only_its_candidate(server: FakeServer, mode: Mode) -> None:
    server.behaviour = "ignore"
    server.fail_seeds = {12: 500}
    replies = replies_of(mode, model(server), [10, 11, 12, 13])

    assert len(server.chat()) == 4
    assert isinstance(replies[2], openai.InternalServerError)
    assert [isinstance(r, AIMessage) for r in replies] == [True, True, False, True]
    assert [r.response_metadata["seed"] for r in replies if isinstance(r, AIMessage)] == [
        10,
        11,
        13,
    ]


# ---------------------------------------------------------------------------------------------
# The per-endpoint bound
# ---------------------------------------------------------------------------------------------


def test_endpoint_limit_holds_for_a_sync_fan_out(server: FakeServer) -> None:
    server.hold_until = 2
    llm = model(server, supports_n=False, max_concurrency=2)
    replies = llm.sample_n("Hi", seeds=list(range(6)))

    assert all(isinstance(r, AIMessage) for r in replies), replies
    assert len(server.chat()) == 6
    assert server.peak == 2, "exactly 2 in flight: the requests overlapped, never more"
    assert llm.limiter.peak == 2 and llm.limiter.in_flight == 0


def test_endpoint_limit_holds_across_threads_and_model_objects(server: FakeServer) -> None:
    server.hold_until = 3
    first = model(server, max_concurrency=3)
    second = model(server, max_concurrency=5)  # the smallest limit of the endpoint wins
    assert first.limiter is second.limiter and first.limiter.limit == 3

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: (first, second)[i % 2].invoke(f"q{i}"), range(8)))

    assert all(isinstance(a, AIMessage) for a in answers)
    assert len(server.chat()) == 8
    assert server.peak == 3


def test_endpoint_limit_holds_across_event_loops(server: FakeServer) -> None:
    server.hold_until = 3
    llm = model(server, supports_n=False, max_concurrency=3)

    def one_loop(base: int) -> list[Any]:
        return asyncio.run(llm.asample_n("Hi", seeds=[base, base + 1, base + 2, base + 3]))

    with ThreadPoolExecutor(max_workers=2) as pool:  # two threads, two event loops
        results = list(pool.map(one_loop, [0, 10]))

    assert all(isinstance(r, AIMessage) for replies in results for r in replies), results
    assert sorted(server.seeds()) == [0, 1, 2, 3, 10, 11, 12, 13]  # type: ignore[type-var]
    assert server.peak == 3
    assert llm.limiter.in_flight == 0


async def test_endpoint_limit_holds_for_an_async_fan_out(server: FakeServer) -> None:
    server.hold_until = 2
    llm = model(server, supports_n=False, max_concurrency=2)
    replies = await llm.asample_n("Hi", seeds=list(range(6)))

    assert all(isinstance(r, AIMessage) for r in replies), replies
    assert len(server.chat()) == 6
    assert server.peak == 2


async def test_cancelled_waiting_request_is_never_sent_and_takes_no_slot(
    server: FakeServer,
) -> None:
    server.gate = threading.Event()
    llm = model(server, max_concurrency=1)
    first = asyncio.create_task(llm.ainvoke("first"))
    for _ in range(200):  # until the first request is at the server
        if server.in_flight:
            break
        await asyncio.sleep(0.01)
    assert server.in_flight == 1
    waiting = asyncio.create_task(llm.ainvoke("waiting"))
    for _ in range(200):  # until it waits for the slot
        if queued(llm.limiter):
            break
        await asyncio.sleep(0.01)
    assert queued(llm.limiter) == 1 and len(server.chat()) == 1

    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert llm.limiter.in_flight == 1  # the cancelled waiter gave nothing back

    server.gate.set()
    assert isinstance(await asyncio.wait_for(first, 5), AIMessage)
    third = await asyncio.wait_for(llm.ainvoke("third"), 5)  # hangs if the slot was lost
    assert isinstance(third, AIMessage)
    assert [b["messages"][0]["content"] for b in server.chat()] == ["first", "third"]
    assert llm.limiter.in_flight == 0 and llm.limiter.peak == 1


async def test_limiter_cancel_while_waiting_releases_nothing() -> None:
    limiter = EndpointLimiter(limit=2)
    limiter.acquire()
    await limiter.aacquire()
    waiter = asyncio.create_task(limiter.aacquire())
    await asyncio.sleep(0)
    assert not waiter.done()

    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.in_flight == 2  # both holders still hold their slots

    limiter.release()
    limiter.release()
    assert limiter.in_flight == 0  # no slot went to the cancelled waiter
    await asyncio.wait_for(limiter.aacquire(), 1)
    assert limiter.in_flight == 1 and limiter.peak == 2


async def test_limiter_cancel_after_grant_passes_the_slot_on() -> None:
    limiter = EndpointLimiter(limit=1)
    await limiter.aacquire()
    first = asyncio.create_task(limiter.aacquire())
    await asyncio.sleep(0)
    second = asyncio.create_task(limiter.aacquire())
    await asyncio.sleep(0)

    limiter.release()  # the slot is handed to `first`...
    first.cancel()  # ...which is cancelled before it runs: the slot must go on to `second`
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)
    assert limiter.in_flight == 1
    limiter.release()
    assert limiter.in_flight == 0 and limiter.peak == 1


def test_limiter_hands_slots_from_threads_to_coroutines() -> None:
    limiter = EndpointLimiter(limit=1)
    limiter.acquire()
    order: list[str] = []

    async def waiter() -> None:
        await limiter.aacquire()
        order.append("coroutine")
        limiter.release()

    def in_thread() -> None:
        limiter.acquire()
        order.append("thread")
        limiter.release()

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.submit(asyncio.run, waiter())
        wait_until(lambda: queued(limiter) == 1)
        other = pool.submit(in_thread)
        wait_until(lambda: queued(limiter) == 2)
        assert order == []
        limiter.release()
        done.result(timeout=2)
        other.result(timeout=2)
    assert order == ["coroutine", "thread"]  # first come, first served
    assert limiter.in_flight == 0


def test_limiter_names_are_reexported_and_shared(url: str) -> None:
    assert EndpointLimiter is endpoint_limits.EndpointLimiter
    assert endpoint_limiter is endpoint_limits.endpoint_limiter
    try:
        limiter = endpoint_limiter(url + "/", limit=4)
        assert endpoint_limiter(url) is limiter and limiter.limit == 4
        assert endpoint_limiter(url, limit=6).limit == 4  # the smallest wins
        assert openai_compatible(url, "m", max_concurrency=2).limiter is limiter
        assert limiter.limit == 2
    finally:
        forget_endpoint(url)
    assert endpoint_limiter(url) is not limiter
    forget_endpoint(url)


@pytest.fixture
def url() -> Iterator[str]:
    """A loopback base URL no server listens on, forgotten before and after the test."""
    base = "http://127.0.0.1:9/v1"
    forget_endpoint(base)
    endpoint_limits._LIMITERS.pop(endpoint_limits.endpoint_key(base), None)
    yield base
    endpoint_limits._LIMITERS.pop(endpoint_limits.endpoint_key(base), None)
    forget_endpoint(base)


def test_a_model_naming_no_limit_keeps_the_endpoint_limit(url: str) -> None:
    limiter = endpoint_limiter(url, limit=32)
    assert openai_compatible(url, "m").limiter is limiter
    assert limiter.limit == 32, "a model that names no limit must not change the endpoint's"
    assert ChatOpenAICompatible(base_url=url, model="m", api_key="x").limiter.limit == 32
    assert openai_compatible(url, "m", max_concurrency=40).limiter.limit == 32  # smallest wins
    assert openai_compatible(url, "m", max_concurrency=4).limiter.limit == 4
    assert openai_compatible(url, "m").limiter.limit == 4


def test_a_named_limit_replaces_the_default_up_or_down(url: str) -> None:
    limiter = openai_compatible(url, "m").limiter
    assert limiter.limit == endpoint_limits.DEFAULT_LOOPBACK_CONCURRENCY and not limiter.explicit
    assert openai_compatible(url, "m", max_concurrency=100).limiter.limit == 100  # raised
    assert limiter.explicit
    assert openai_compatible(url, "m", max_concurrency=200).limiter.limit == 100
    assert openai_compatible(url, "m").limiter.limit == 100


def test_default_limits_are_higher_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    loopback: list[str | None] = [
        "http://127.0.0.1:9/v1",
        "http://localhost:9/v1",
        "http://[::1]:9/v1",
    ]
    remote: list[str | None] = ["https://llm.example.com/v1", "http://10.0.0.5:8000/v1", None]
    try:
        for base in loopback:
            assert endpoint_limiter(base).limit == 64 == endpoint_limits.default_limit(base)
        for base in remote:
            assert endpoint_limiter(base).limit == 16 == endpoint_limits.default_limit(base)
        assert openai_compatible("https://llm.example.com/v1", "m").limiter.limit == 16
        assert openai_compatible("http://localhost:9/v1", "m").limiter.limit == 64
    finally:
        for base in [*loopback, *remote]:
            forget_endpoint(base)


async def test_default_limit_runs_a_fan_out_of_64_at_once_on_loopback(server: FakeServer) -> None:
    server.hold_until, server.hold_timeout_s = 64, 10
    llm = model(server, supports_n=False)
    replies = await llm.asample_n("Hi", seeds=list(range(64)))

    assert all(isinstance(r, AIMessage) for r in replies), replies
    assert len(server.chat()) == 64
    assert server.peak == 64 == llm.limiter.peak


async def test_a_lowered_limit_applies_to_callers_already_waiting(url: str) -> None:
    limiter = endpoint_limiter(url, limit=3)
    for _ in range(3):
        await limiter.aacquire()
    waiters = [asyncio.create_task(limiter.aacquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert queued(limiter) == 3

    assert endpoint_limiter(url, limit=1) is limiter and limiter.limit == 1
    limiter.release()
    limiter.release()
    await asyncio.sleep(0)
    # Two slots came back, but one is still held: at the new limit, none may be handed on.
    assert (limiter.in_flight, queued(limiter)) == (1, 3)
    assert not any(w.done() for w in waiters)

    limiter.release()
    await asyncio.wait_for(asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED), 2)
    assert (limiter.in_flight, queued(limiter)) == (1, 2)
    for _ in range(2):
        limiter.release()
        await asyncio.sleep(0.01)
        assert limiter.in_flight == 1
    await asyncio.wait_for(asyncio.gather(*waiters), 2)
    limiter.release()
    assert limiter.in_flight == 0 and limiter.peak == 3


def test_a_lowered_limit_applies_to_threads_already_waiting(url: str) -> None:
    limiter = endpoint_limiter(url, limit=2)
    limiter.acquire()
    limiter.acquire()
    got: list[int] = []

    def wait(i: int) -> None:
        limiter.acquire()
        got.append(i)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(wait, i) for i in range(2)]
        try:
            wait_until(lambda: queued(limiter) == 2)
            endpoint_limiter(url, limit=1)
            limiter.release()
            assert (limiter.in_flight, queued(limiter), got) == (1, 2, [])
            limiter.release()
            wait_until(lambda: len(got) == 1)
            assert (limiter.in_flight, queued(limiter)) == (1, 1)
            limiter.release()
            for future in futures:
                future.result(timeout=2)
        finally:
            while not all(f.done() for f in futures):  # never leave a thread blocked
                limiter.release()
                time.sleep(0.01)
    limiter.release()
    assert limiter.in_flight == 0


async def test_a_raised_limit_hands_the_new_slots_to_waiters() -> None:
    limiter = EndpointLimiter(limit=1)
    await limiter.aacquire()
    waiters = [asyncio.create_task(limiter.aacquire()) for _ in range(3)]
    await asyncio.sleep(0)

    limiter.set_limit(3)
    await asyncio.wait_for(asyncio.wait(waiters[:2]), 2)
    assert [w.done() for w in waiters] == [True, True, False]
    assert limiter.in_flight == 3
    limiter.release()
    await asyncio.wait_for(waiters[2], 2)
    for _ in range(3):
        limiter.release()
    assert limiter.in_flight == 0


@pytest.fixture
def interrupt_main_thread() -> Iterator[Any]:
    """``interrupt(when, then=None)``: once ``when()`` holds, a helper thread signals the
    main thread, whose handler runs ``then()`` and raises KeyboardInterrupt (what Ctrl-C
    does to a thread blocked waiting for a slot)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    actions: list[Any] = []

    def handler(signum: int, frame: Any) -> None:
        for action in actions:
            action()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, handler)
    helpers: list[threading.Thread] = []

    def interrupt(when: Any, then: Any = None) -> None:
        if then is not None:
            actions.append(then)

        def fire() -> None:
            wait_until(when, 5)
            time.sleep(0.05)  # into the wait itself
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

        helper = threading.Thread(target=fire, daemon=True)
        helpers.append(helper)
        helper.start()

    yield interrupt
    for helper in helpers:
        helper.join(5)
    signal.signal(signal.SIGUSR1, previous)


def test_a_thread_interrupted_while_waiting_takes_no_slot(interrupt_main_thread: Any) -> None:
    limiter = EndpointLimiter(limit=1)
    limiter.acquire()
    interrupt_main_thread(lambda: queued(limiter) == 1)
    with pytest.raises(KeyboardInterrupt):
        limiter.acquire()
    assert queued(limiter) == 0, "the interrupted waiter must leave the queue"
    limiter.release()
    assert limiter.in_flight == 0
    with limiter.slot():  # hangs if the slot went to the interrupted waiter
        assert limiter.in_flight == 1


def test_a_thread_interrupted_once_handed_a_slot_passes_it_on(
    interrupt_main_thread: Any,
) -> None:
    limiter = EndpointLimiter(limit=1)
    limiter.acquire()
    # The holder gives its slot back (to the waiting main thread) just before the interrupt.
    interrupt_main_thread(lambda: queued(limiter) == 1, then=limiter.release)
    with pytest.raises(KeyboardInterrupt):
        limiter.acquire()
    assert (limiter.in_flight, queued(limiter)) == (0, 0), "the handed-over slot leaked"


def test_a_sync_request_interrupted_while_queued_is_never_sent(
    server: FakeServer, interrupt_main_thread: Any
) -> None:
    server.gate = threading.Event()
    llm = model(server, max_concurrency=1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(llm.invoke, "first")
        wait_until(lambda: server.in_flight == 1)
        interrupt_main_thread(lambda: queued(llm.limiter) == 1)
        with pytest.raises(KeyboardInterrupt):
            llm.invoke("interrupted")
        assert queued(llm.limiter) == 0
        server.gate.set()
        assert isinstance(first.result(timeout=5), AIMessage)
    assert isinstance(llm.invoke("third"), AIMessage)
    assert [b["messages"][0]["content"] for b in server.chat()] == ["first", "third"]
    assert llm.limiter.in_flight == 0


# ---------------------------------------------------------------------------------------------
# Queue time is not latency
# ---------------------------------------------------------------------------------------------


def test_latency_excludes_the_time_queued_for_a_slot(server: FakeServer) -> None:
    held_s = 0.3
    server.gate = threading.Event()
    llm = model(server, supports_n=False, max_concurrency=1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        start = time.perf_counter()
        done = pool.submit(llm.sample_n, "Hi", seeds=[1, 2])
        wait_until(lambda: server.in_flight == 1 and queued(llm.limiter) == 1)
        time.sleep(held_s)  # the first request is held at the server, the second queues
        server.gate.set()
        replies = done.result(timeout=10)
        wall = time.perf_counter() - start

    messages = [r for r in replies if isinstance(r, AIMessage)]
    assert len(messages) == 2, replies
    meta = sorted((r.response_metadata for r in messages), key=lambda m: m["queue_s"])
    first, second = meta
    assert first["latency_s"] >= held_s  # it was at the server the whole time
    assert second["queue_s"] >= held_s  # it waited the whole time the first was held
    for m in meta:
        # Two disjoint parts of the call: the request's own time leaves the queue out.
        assert m["queue_s"] >= 0 and m["latency_s"] > 0
        assert m["queue_s"] + m["latency_s"] <= wall


async def test_async_replies_and_fused_candidates_report_queue_and_latency(
    server: FakeServer,
) -> None:
    llm = model(server, supports_n=False, max_concurrency=2)
    result = await fusion_of_n(llm, n=4, fusor=llm, seed=1).arun("Hi")

    assert [c.ok for c in result.candidates] == [True] * 4
    for c in result.candidates:
        assert c.message is not None
        meta = c.message.response_metadata
        assert meta["queue_s"] >= 0 and meta["latency_s"] > 0
        assert c.latency_s == meta["latency_s"]  # the fan-out's latency of a sample
    reply = await llm.ainvoke("Hi")
    assert {"queue_s", "latency_s"} <= set(reply.response_metadata)


# ---------------------------------------------------------------------------------------------
# Per-event-loop clients
# ---------------------------------------------------------------------------------------------


def test_each_event_loops_client_is_closed_when_the_loop_shuts_down(server: FakeServer) -> None:
    llm = model(server)
    before = len(loop_clients.LOOPS)
    for i in range(3):
        assert isinstance(asyncio.run(llm.ainvoke(f"q{i}")), AIMessage)
        # The loop's connection was closed with the loop, not left open (nor the loop kept).
        wait_until(lambda: server.connections == 0, 5)
        assert len(loop_clients.LOOPS) == before
    assert server.connections_opened == 3


def test_one_event_loop_reuses_its_client(server: FakeServer) -> None:
    llm = model(server)

    async def twice() -> None:
        await llm.ainvoke("a")
        await llm.ainvoke("b")
        await llm.ainvoke("c")

    asyncio.run(twice())
    assert len(server.chat()) == 3
    assert server.connections_opened == 1  # one client, one pooled connection, per loop


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_clients_of_a_loop_closed_without_shutdown_are_dropped(server: FakeServer) -> None:
    llm = model(server)
    before = len(loop_clients.LOOPS)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(llm.ainvoke("a"))  # no shutdown_asyncgens: nothing was closed
    loop.close()
    asyncio.run(llm.ainvoke("b"))  # the next copy made drops the closed loop's

    assert loop not in loop_clients.LOOPS
    assert len(loop_clients.LOOPS) == before
    del loop
    gc.collect()  # its sockets close when collected
    wait_until(lambda: server.connections == 0, 5)


def test_the_client_of_a_model_gone_is_closed_at_the_next_copy(server: FakeServer) -> None:
    async def main() -> None:
        first = model(server)
        await first.ainvoke("a")
        assert server.connections == 1
        del first
        gc.collect()
        await model(server).ainvoke("b")  # a new copy on this loop closes the gone one's
        for _ in range(500):
            if server.connections == 1:
                break
            await asyncio.sleep(0.01)
        assert server.connections == 1

    asyncio.run(main())
    wait_until(lambda: server.connections == 0, 5)


# ---------------------------------------------------------------------------------------------
# openai_compatible
# ---------------------------------------------------------------------------------------------


def test_remote_url_without_an_api_key_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(ValueError, match="set the environment variable OPENAI_API_KEY") as err:
        openai_compatible("https://llm.example.com/v1", "m")
    text = str(err.value)
    assert text.startswith("No API key for https://llm.example.com/v1") and text.endswith(".")
    with pytest.raises(ValueError, match="MY_KEY"):
        openai_compatible("https://llm.example.com/v1", "m", api_key_env="MY_KEY")
    with pytest.raises(ValueError, match="not an http"):
        openai_compatible("llm.example.com:8000", "m")

    monkeypatch.setenv("MY_KEY", "secret")
    llm = openai_compatible("https://llm.example.com/v1", "m", api_key_env="MY_KEY")
    assert isinstance(llm.openai_api_key, SecretStr)
    assert llm.openai_api_key.get_secret_value() == "secret"
    # Loopback needs no key.
    assert openai_compatible("http://127.0.0.1:8000/v1", "m").endpoint == (
        "http://127.0.0.1:8000/v1"
    )


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_fusion_of_n_makes_the_candidates_in_one_request(server: FakeServer, mode: Mode) -> None:
    llm = model(server)
    result = mode.run(fusion_of_n(llm, n=4, fusor=llm, seed=100), "Name a primary colour.")

    bodies = server.chat()
    assert [b.get("n") for b in bodies] == [4, None]  # the candidates, then the fusor
    assert bodies[0]["seed"] == 100 == result.candidates[0].seed
    assert [c.ok for c in result.candidates] == [True] * 4
    assert [c.text for c in result.candidates] == [
        f"answer {i} for seed 100" + "!" * i for i in range(4)
    ]
    assert sum(c.usage.input_tokens for c in result.candidates if c.usage) == PROMPT_TOKENS
    fusor_prompt = json.dumps(bodies[1]["messages"])
    assert all(c.text in fusor_prompt for c in result.candidates)
    assert result.decision.fused and result.message.content == "answer 0 for seed None"


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8000/v1", True),
        ("http://127.3.2.1/v1", True),
        ("http://localhost:8000/v1", True),
        ("http://[::1]:8000/v1", True),
        ("http://localhost.evil.example/v1", False),
        ("http://127.evil.example/v1", False),
        ("https://api.example.com/v1", False),
    ],
)
def test_only_real_loopback_hosts_skip_the_api_key(url: str, loopback: bool) -> None:
    from fusion_graph.integrations.openai_compat import _is_loopback

    assert _is_loopback(url) is loopback
