"""Bad input, auth, upstream failures and overload: OpenAI-style errors with the right
status; a client that leaves cancels its upstream work; shutdown drains requests."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from fusion_graph.serve import ServeLimits
from fusion_graph.testing import FakeChatModel
from tests.faults.fake_openai import FakeOpenAI, Fault, candidate
from tests.serve.conftest import FAKE_MODEL, RunningProxy, Serve, fake_spec

pytestmark = pytest.mark.server

QUESTION = [{"role": "user", "content": "What is six times seven?"}]


def every(_: Any) -> bool:
    return True


def post(proxy: RunningProxy, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{proxy.base_url}/chat/completions", json=body, timeout=30, **kwargs)


def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": QUESTION}, "model"),
        ({"model": FAKE_MODEL, "messages": []}, "messages"),
        ({"model": FAKE_MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": FAKE_MODEL, "messages": QUESTION, "temperature": 9}, "temperature"),
        ({"model": "fusion-x/fake", "messages": QUESTION}, "model"),
        ({"model": "bon-4-best/fake", "messages": QUESTION}, "model"),
        ({"model": "fusion-99/fake", "messages": QUESTION}, "model"),
        ({"model": FAKE_MODEL, "messages": QUESTION, "fusion_graph": {"n": 0}}, "fusion_graph.n"),
        ({"model": FAKE_MODEL, "messages": QUESTION, "fusion_graph": {"k": 2}}, "fusion_graph.k"),
        ({"model": FAKE_MODEL, "messages": QUESTION, "max_tokens": 100_000}, "max_tokens"),
        ({"model": FAKE_MODEL, "messages": QUESTION, "n": 9}, "n"),  # over max_n
        ({"model": "fusion-2/fake", "messages": QUESTION, "n": 2}, "n"),  # n is the strategy's
    ],
)
def test_bad_requests_are_400_naming_the_param(
    proxy: RunningProxy, fake_openai: FakeOpenAI, body: dict[str, Any], param: str
) -> None:
    response = post(proxy, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert set(error) >= {"message", "type", "param", "code"}
    assert fake_openai.received == 0


def test_malformed_json_is_400(proxy: RunningProxy) -> None:
    response = httpx.post(
        f"{proxy.base_url}/chat/completions",
        content=b'{"model": "fake", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_openai_client_sees_a_bad_request_error(proxy: RunningProxy) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown strategy"):
        proxy.client().chat.completions.create(model="fusion-many/fake", messages=QUESTION)


def test_an_unknown_model_is_404(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        proxy.client().chat.completions.create(model="fusion-2/gpt-9", messages=QUESTION)
    assert caught.value.code == "model_not_found"
    assert fake_openai.received == 0


def test_oversize_bodies_are_413(fake_openai: FakeOpenAI, serve: Serve) -> None:
    proxy = serve(fake_spec(fake_openai), limits=ServeLimits(max_body_bytes=2_000))
    big = [{"role": "user", "content": "x" * 5_000}]
    response = post(proxy, {"model": FAKE_MODEL, "messages": big})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    def chunked() -> Any:  # no Content-Length: counted while reading
        yield json.dumps({"model": FAKE_MODEL, "messages": big}).encode()

    response = httpx.post(f"{proxy.base_url}/chat/completions", content=chunked())
    assert response.status_code == 413
    assert fake_openai.received == 0
    assert post(proxy, {"model": FAKE_MODEL, "messages": QUESTION}).status_code == 200


def test_a_key_is_required_when_set(fake_openai: FakeOpenAI, serve: Serve) -> None:
    proxy = serve(fake_spec(fake_openai), api_key="s3cret-key")
    for key in ("wrong", "s3cret-ke", "s3cret-key2"):
        with pytest.raises(openai.AuthenticationError) as caught:
            proxy.client(api_key=key).chat.completions.create(model=FAKE_MODEL, messages=QUESTION)
        assert "s3cret-key" not in str(caught.value)
    assert post(proxy, {"model": FAKE_MODEL, "messages": QUESTION}).status_code == 401
    assert fake_openai.received == 0
    reply = proxy.client(api_key="s3cret-key").chat.completions.create(
        model=FAKE_MODEL, messages=QUESTION
    )
    assert reply.choices[0].message.content
    assert httpx.get(f"{proxy.url}/health").status_code == 200  # open, for probes


@pytest.mark.parametrize("stream", [False, True])
def test_too_few_candidates_is_502_with_every_cause(
    proxy: RunningProxy, fake_openai: FakeOpenAI, stream: bool
) -> None:
    fake_openai.configure(rules=[(candidate, Fault.status(400))])
    response = post(proxy, {"model": "fusion-3/fake", "messages": QUESTION, "stream": stream})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "not_enough_candidates"
    assert [c["index"] for c in error["causes"]] == [0, 1, 2]
    assert all("injected 400" in c["message"] for c in error["causes"])
    assert "0 of 3 candidates succeeded" in error["message"]


def test_a_failing_upstream_is_502_for_a_langchain_pass_through(serve: Serve) -> None:
    """An upstream given as a chat model passes through LangChain: its failure is a 502.
    (An ``openai:`` upstream's own status passes through: see test_pass_through.)"""
    failing = FakeChatModel(
        replies=[openai.APIConnectionError(request=httpx.Request("POST", "http://x"))],
        model_name="failing",
    )
    proxy = serve(failing)
    with pytest.raises(openai.APIStatusError) as caught:
        proxy.client().chat.completions.create(model="failing", messages=QUESTION)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unreachable"


def test_a_minority_of_failures_still_answers(proxy: RunningProxy, fake_openai: FakeOpenAI) -> None:
    fake_openai.configure(
        rules=[
            (lambda r: r.seed is not None and r.n == 1 and r.seed % 3 == 0, Fault.status(400)),
            (lambda r: r.n > 1, Fault.status(400)),
        ]
    )
    reply = proxy.client().chat.completions.create(model="fusion-3/fake", messages=QUESTION)
    statuses = [c["status"] for c in reply.model_extra["fusion_graph"]["candidates"]]
    assert statuses.count("failed") == sum(
        1 for r in fake_openai.requests if r.n == 1 and r.seed is not None and r.seed % 3 == 0
    )
    assert "ok" in statuses


def slow_request(
    proxy: RunningProxy, model: str = FAKE_MODEL
) -> tuple[threading.Thread, list[Any]]:
    """A request in a thread; its response (or error) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(post(proxy, {"model": model, "messages": QUESTION}))
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_overload_is_429_with_retry_after(fake_openai: FakeOpenAI, serve: Serve) -> None:
    limits = ServeLimits(max_in_flight=1, max_queue=1, retry_after_s=3)
    proxy = serve(fake_spec(fake_openai), limits=limits)
    fake_openai.configure(rules=[(every, Fault.slow_first_byte(30))])
    first, first_out = slow_request(proxy)
    eventually(lambda: fake_openai.in_flight == 1, "the first request at the upstream")
    queued, queued_out = slow_request(proxy)
    eventually(lambda: httpx.get(f"{proxy.url}/health").json()["waiting"] == 1, "one queued")
    with pytest.raises(openai.RateLimitError) as caught:
        proxy.client().chat.completions.create(model=FAKE_MODEL, messages=QUESTION)
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.code == "overloaded"
    assert fake_openai.received == 1  # the queued one has not reached the upstream yet
    fake_openai.hurry()
    first.join(30)
    queued.join(30)
    assert [r.status_code for r in first_out + queued_out] == [200, 200]
    assert fake_openai.received == 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["fusion-2/fake", FAKE_MODEL])
def test_a_client_that_leaves_cancels_the_upstream_calls(
    proxy: RunningProxy, fake_openai: FakeOpenAI, stream: bool, model: str
) -> None:
    fake_openai.configure(rules=[(every, Fault.slow_first_byte(30))])
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    body = {"model": model, "messages": QUESTION, "stream": stream}
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"content-type": "application/json"},
    )
    eventually(lambda: fake_openai.in_flight == 1, "the request at the upstream")
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # The proxy closes its upstream connection: the fake sees its client go, long before
    # the 30 s the answer would take.
    assert fake_openai.wait_idle(10)
    assert fake_openai.outcomes == ["abandoned"]
    eventually(lambda: httpx.get(f"{proxy.url}/health").json()["in_flight"] == 0, "turn back")


def test_shutdown_drains_requests_in_flight(fake_openai: FakeOpenAI, serve: Serve) -> None:
    proxy = serve(fake_spec(fake_openai))
    fake_openai.configure(rules=[(every, Fault.slow_first_byte(30))])
    request, out = slow_request(proxy, "fusion-2/fake")
    eventually(lambda: fake_openai.in_flight == 1, "the request at the upstream")
    proxy.server.should_exit = True

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        except OSError:
            return True
        return False

    eventually(refused, "the proxy to stop listening")
    fake_openai.hurry()
    request.join(30)
    assert [r.status_code for r in out] == [200]
    assert out[0].json()["choices"][0]["message"]["content"] == "The fused answer is 42."
    proxy.thread.join(30)
    assert not proxy.thread.is_alive()
