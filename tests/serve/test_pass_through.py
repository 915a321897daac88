"""The raw pass-through of ``openai:`` / ``vllm:`` upstreams: a plain model name forwards the
request body (only ``model`` replaced, ``fusion_graph`` dropped) and relays the upstream's
answer untouched, byte for byte and as it comes; one upstream request per request; the
upstream's errors keep their status; a client that leaves closes the upstream stream; the
admission limits and the endpoint's concurrency limit hold.

Two upstreams: the counting fake of ``tests/faults``, and :class:`RecordingUpstream`, which
answers with fixed bytes (fields the LangChain path drops: ``logprobs``, several choices,
``system_fingerprint``, an unknown field) and streams them when told to.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from fusion_graph.integrations.endpoint_limits import endpoint_limiter
from fusion_graph.serve import ServeLimits
from tests.faults.fake_openai import FakeOpenAI, Fault
from tests.serve.conftest import (
    FAKE_MODEL,
    RunningProxy,
    Serve,
    fake_spec,
    forget_upstream,
    start_proxy,
)

pytestmark = pytest.mark.server

QUESTION = [{"role": "user", "content": "What is six times seven?"}]

ANSWER = (
    b'{"id": "chatcmpl-up",  "object": "chat.completion", "created": 1700000000, '
    b'"model": "up-model-2024", "system_fingerprint": "fp_up", "service_tier": "default", '
    b'"choices": [{"index": 0, "message": {"role": "assistant", "content": "42"}, '
    b'"logprobs": {"content": [{"token": "42", "logprob": -0.01, "bytes": [52, 50], '
    b'"top_logprobs": [{"token": "42", "logprob": -0.01, "bytes": [52, 50]}, '
    b'{"token": "41", "logprob": -4.6, "bytes": [52, 49]}]}]}, "finish_reason": "stop"}, '
    b'{"index": 1, "message": {"role": "assistant", "content": "forty-two"}, '
    b'"logprobs": null, "finish_reason": "length"}], '
    b'"usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12, '
    b'"completion_tokens_details": {"reasoning_tokens": 0}}, "x_upstream_extra": [1, 2]}'
)
"""What the recording upstream answers: fields and spacing the LangChain path would lose."""

STREAM = [
    b": upstream keep-alive\n\n",
    b'data: {"id":"chatcmpl-up","object":"chat.completion.chunk","created":1,'
    b'"model":"up-model-2024","choices":[{"index":0,"delta":{"role":"assistant",'
    b'"content":"4"},"logprobs":{"content":[{"token":"4","logprob":-0.2,"bytes":[52],'
    b'"top_logprobs":[]}]},"finish_reason":null}]}\n\n',
    b'data: {"id":"chatcmpl-up","object":"chat.completion.chunk","created":1,'
    b'"model":"up-model-2024","choices":[{"index":0,"delta":{"content":"2"},'
    b'"logprobs":null,"finish_reason":"stop"}],"x_upstream_extra":true}\n\n',
    b"data: [DONE]\n\n",
]
"""What it streams: a comment, then the chunks; the first piece alone until the gate opens."""


class RecordingUpstream:
    """An OpenAI-compatible upstream (a Starlette app on loopback) that records the bodies
    and headers it receives and answers with :data:`ANSWER` or :data:`STREAM`. A stream
    sends its first piece, then waits (10 s at most) for :attr:`gate` before the rest."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.gate = threading.Event()
        self.stream_closed = threading.Event()
        """Set when a stream's generator ends, however (finished or its client gone)."""
        self.stream_finished = threading.Event()
        """Set when a stream was sent whole."""
        self.compress = False
        """Answer gzip-compressed to a client that accepts it."""
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.answer, methods=["POST"])])

    async def answer(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        headers = {
            "x-request-id": "req-up-1",
            "x-ratelimit-remaining-requests": "99",
            "set-cookie": "upstream=private",
        }
        if not body.get("stream"):
            if self.compress and "gzip" in request.headers.get("accept-encoding", ""):
                headers["content-encoding"] = "gzip"
                return Response(
                    gzip.compress(ANSWER), media_type="application/json", headers=headers
                )
            return Response(ANSWER, media_type="application/json", headers=headers)
        return StreamingResponse(self.pieces(), media_type="text/event-stream", headers=headers)

    async def pieces(self) -> AsyncIterator[bytes]:
        try:
            yield STREAM[0]
            deadline = time.monotonic() + 10
            # The gate is opened from the test's thread: no asyncio.Event can be waited on here.
            while not self.gate.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            for piece in STREAM[1:]:
                yield piece
            self.stream_finished.set()
        finally:
            self.stream_closed.set()


@pytest.fixture
def recording() -> Iterator[tuple[RecordingUpstream, str]]:
    """The recording upstream and its base URL."""
    upstream = RecordingUpstream()
    running = start_proxy(upstream.app)  # any ASGI app runs there
    base_url = f"{running.url}/v1"
    yield upstream, base_url
    upstream.gate.set()
    running.stop()
    forget_upstream(base_url)


def post(proxy: RunningProxy, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{proxy.base_url}/chat/completions", json=body, timeout=30, **kwargs)


def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# --- what goes up, what comes back ----------------------------------------------------------


def test_the_body_goes_up_as_it_came_but_for_model(
    recording: tuple[RecordingUpstream, str], serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream, base_url = recording
    monkeypatch.setenv("UPSTREAM_KEY", "upstream-s3cret")
    proxy = serve(
        f"openai:{base_url}:up-model:name=alias,api_key_env=UPSTREAM_KEY", api_key="proxy-key"
    )
    body = {
        "model": "alias",
        "messages": [{"role": "system", "content": "Be brief."}, *QUESTION],
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "response_format": {"type": "json_object"},
        "metadata": {"team": "a"},
        "some_future_field": {"nested": [1, 2, {"x": None}]},
        "temperature": 0.3,
        "fusion_graph": {"strategy": "none"},
    }
    response = post(proxy, body, headers={"Authorization": "Bearer proxy-key"})
    assert response.status_code == 200
    [received] = upstream.bodies
    expected = {k: v for k, v in body.items() if k != "fusion_graph"}
    assert received == {**expected, "model": "up-model"}
    assert list(received) == list(expected)  # in the order it came
    [headers] = upstream.headers
    assert headers["authorization"] == "Bearer upstream-s3cret"  # the upstream's key, never ours
    assert "proxy-key" not in json.dumps(upstream.headers)
    # The answer comes back as the upstream sent it: every byte, and the headers that matter.
    assert response.content == ANSWER
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "req-up-1"
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert "set-cookie" not in response.headers


def test_the_openai_client_sees_what_the_langchain_path_drops(
    recording: tuple[RecordingUpstream, str], serve: Serve
) -> None:
    _, base_url = recording
    proxy = serve(f"openai:{base_url}:up-model")
    reply = proxy.client().chat.completions.create(
        model="up-model", messages=QUESTION, n=2, logprobs=True, top_logprobs=2
    )
    assert [c.message.content for c in reply.choices] == ["42", "forty-two"]
    assert [c.finish_reason for c in reply.choices] == ["stop", "length"]
    top = reply.choices[0].logprobs.content[0].top_logprobs
    assert [(t.token, t.logprob) for t in top] == [("42", -0.01), ("41", -4.6)]
    assert reply.system_fingerprint == "fp_up"
    assert reply.model == "up-model-2024"  # what ran, in the upstream's words
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0
    assert reply.model_extra["x_upstream_extra"] == [1, 2]


def test_a_compressed_answer_stays_compressed_for_a_client_that_accepts_it(
    recording: tuple[RecordingUpstream, str], serve: Serve
) -> None:
    upstream, base_url = recording
    upstream.compress = True
    proxy = serve(f"openai:{base_url}:up-model")
    body = {"model": "up-model", "messages": QUESTION}
    with httpx.Client(timeout=30) as client:  # sends Accept-Encoding: gzip, ...
        compressed = client.post(f"{proxy.base_url}/chat/completions", json=body)
        plain = client.post(
            f"{proxy.base_url}/chat/completions",
            json=body,
            headers={"Accept-Encoding": "identity"},
        )
    assert compressed.headers["content-encoding"] == "gzip"
    assert compressed.content == ANSWER  # httpx decoded what the upstream compressed
    assert "content-encoding" not in plain.headers
    assert plain.content == ANSWER
    assert [h["accept-encoding"] for h in upstream.headers][1] == "identity"


def test_a_stream_is_relayed_byte_for_byte_as_it_comes(
    recording: tuple[RecordingUpstream, str], serve: Serve
) -> None:
    upstream, base_url = recording
    proxy = serve(f"openai:{base_url}:up-model")
    body = {"model": "up-model", "messages": QUESTION, "stream": True, "logprobs": True}
    received = b""
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"] == "req-up-1"
        for piece in r.iter_raw():
            received += piece
            if not upstream.gate.is_set():
                assert STREAM[0].startswith(received)  # nothing else exists yet
                if received == STREAM[0]:  # here while the upstream holds the rest
                    upstream.gate.set()
    assert upstream.gate.is_set()
    assert received == b"".join(STREAM)
    assert upstream.stream_finished.is_set()


def test_a_client_that_leaves_mid_stream_closes_the_upstream_stream(
    recording: tuple[RecordingUpstream, str], serve: Serve
) -> None:
    upstream, base_url = recording
    proxy = serve(f"openai:{base_url}:up-model")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    body = {"model": "up-model", "messages": QUESTION, "stream": True}
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"}
    )
    response = conn.getresponse()
    assert response.status == 200
    first = b""
    while len(first) < len(STREAM[0]):
        first += response.read1(len(STREAM[0]) - len(first))
    assert first == STREAM[0]  # the stream is under way: now leave
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # Long before the upstream's 10 s wait is over, the proxy has closed its stream.
    assert upstream.stream_closed.wait(5)
    assert not upstream.stream_finished.is_set()
    eventually(lambda: httpx.get(f"{proxy.url}/health").json()["in_flight"] == 0, "turn back")
    eventually(lambda: endpoint_limiter(base_url).in_flight == 0, "endpoint slot back")


# --- against the counting fake ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_one_request_is_one_upstream_request(
    proxy: RunningProxy, fake_openai: FakeOpenAI, stream: bool
) -> None:
    body = {"model": FAKE_MODEL, "messages": QUESTION, "stream": stream, "seed": 5, "n": 3}
    response = post(proxy, body)
    assert response.status_code == 200
    assert fake_openai.received == 1
    [request] = fake_openai.requests
    assert request.body == body
    assert (request.n, request.seed, request.stream) == (3, 5, stream)
    if stream:
        assert response.text.endswith("data: [DONE]\n\n")
        assert response.text.count('"finish_reason": "stop"') == 3  # every choice's
    else:
        assert len(response.json()["choices"]) == 3
        assert "fusion_graph" not in response.json()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("fault", "status", "headers"),
    [
        (Fault.status(400), 400, {}),
        (Fault.too_many_requests(7), 429, {"retry-after": "7"}),
        (Fault.status(503), 503, {}),
    ],
)
def test_upstream_errors_keep_their_status_and_body(
    proxy: RunningProxy,
    fake_openai: FakeOpenAI,
    fault: Fault,
    status: int,
    headers: dict[str, str],
    stream: bool,
) -> None:
    fake_openai.configure(rules=[(lambda _: True, fault)])
    response = post(proxy, {"model": FAKE_MODEL, "messages": QUESTION, "stream": stream})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] == f"injected {status}"  # the upstream's own error body
    assert error["type"] == ("rate_limit_error" if status == 429 else "server_error")
    for name, value in headers.items():
        assert response.headers[name] == value
    assert fake_openai.received == 1  # not retried by the proxy: the client decides


def test_the_openai_client_gets_the_upstreams_error(
    proxy: RunningProxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(rules=[(lambda _: True, Fault.status(400))])
    with pytest.raises(openai.BadRequestError, match="injected 400"):
        proxy.client().chat.completions.create(model=FAKE_MODEL, messages=QUESTION)


def test_an_unreachable_upstream_is_502(serve: Serve) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # nobody listens there once it is closed
    proxy = serve(f"openai:http://127.0.0.1:{port}/v1:m")
    response = post(proxy, {"model": "m", "messages": QUESTION})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"


def test_an_answer_that_breaks_off(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    fake_openai.configure(rules=[(lambda _: True, Fault.truncated())])
    whole = post(proxy, {"model": FAKE_MODEL, "messages": QUESTION})
    assert whole.status_code == 502  # read whole before answering: still a status to give
    assert whole.json()["error"]["code"] == "upstream_incomplete"
    streamed = post(proxy, {"model": FAKE_MODEL, "messages": QUESTION, "stream": True})
    assert streamed.status_code == 200  # already under way: it ends with an error event
    last = [line for line in streamed.text.splitlines() if line.startswith("data: ")][-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "upstream_incomplete"
    assert httpx.get(f"{proxy.url}/health").json()["in_flight"] == 0


# --- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_pass_through_holds_its_turn_until_its_answer_is_done(
    fake_openai: FakeOpenAI, serve: Serve, stream: bool
) -> None:
    proxy = serve(fake_spec(fake_openai), limits=ServeLimits(max_in_flight=1, max_queue=0))
    fake_openai.configure(rules=[(lambda _: True, Fault.slow_first_byte(30))])
    out: list[httpx.Response] = []
    first = threading.Thread(
        target=lambda: out.append(
            post(proxy, {"model": FAKE_MODEL, "messages": QUESTION, "stream": stream})
        )
    )
    first.start()
    eventually(lambda: fake_openai.in_flight == 1, "the first request at the upstream")
    refused = post(proxy, {"model": FAKE_MODEL, "messages": QUESTION})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "overloaded"
    fake_openai.hurry()
    first.join(30)
    assert [r.status_code for r in out] == [200]
    assert fake_openai.received == 1
    eventually(lambda: httpx.get(f"{proxy.url}/health").json()["in_flight"] == 0, "turn back")


def test_the_endpoints_concurrency_limit_holds(prompt_fake: FakeOpenAI, serve: Serve) -> None:
    proxy = serve(f"openai:{prompt_fake.base_url}:fake:concurrency=2")
    prompt_fake.configure(rules=[(lambda _: True, Fault.slow_first_byte(0.2))])

    async def six() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": FAKE_MODEL, "messages": QUESTION}
            url = f"{proxy.base_url}/chat/completions"
            responses = await asyncio.gather(*(client.post(url, json=body) for _ in range(6)))
        return [r.status_code for r in responses]

    assert asyncio.run(six()) == [200] * 6
    assert prompt_fake.received == 6
    assert prompt_fake.peak_in_flight == 2


def test_replicas_take_turns(
    fake_openai: FakeOpenAI, prompt_fake: FakeOpenAI, serve: Serve
) -> None:
    proxy = serve(f"openai:{fake_openai.base_url}+{prompt_fake.base_url}:{FAKE_MODEL}")
    for stream in (False, True, False, True):
        assert post(proxy, {"model": FAKE_MODEL, "messages": QUESTION, "stream": stream}).is_success
    assert (fake_openai.received, prompt_fake.received) == (2, 2)
