"""The lean request path of ``ChatOpenAICompatible`` (no SDK, no callback bookkeeping when
nobody listens), against a loopback server: what reaches the server, what comes back (per
choice logprobs, structured replies), the exception classes and retries, callbacks and run
nesting when a handler is attached, parallelism (counted at the server, never timed) and the
connections of each event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import UUID

import openai
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import RunnableLambda
from pydantic import BaseModel

from fusion_graph.integrations import loop_clients
from fusion_graph.integrations.openai_compat import (
    ChatOpenAICompatible,
    forget_endpoint,
    openai_compatible,
)
from fusion_graph.nodes.verdicts import takes_json_schema
from tests.conftest import Mode
from tests.faults.fake_openai import FakeOpenAI, reply_text

Answer = Callable[[dict[str, Any]], tuple[int, dict[str, Any], dict[str, str]]]


def logprobs_of(token: str) -> dict[str, Any]:
    return {
        "content": [
            {"token": token, "logprob": -0.1, "top_logprobs": [{"token": token, "logprob": -0.1}]}
        ]
    }


def completion(body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """n choices; choice i says ``{"score": i}`` with its own logprobs and finish reason."""
    k = int(body.get("n") or 1)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": json.dumps({"score": i})},
            "finish_reason": "length" if i % 2 else "stop",
            "logprobs": logprobs_of(str(i)) if body.get("logprobs") else None,
        }
        for i in range(k)
    ]
    usage = {"prompt_tokens": 10, "completion_tokens": 3 * k, "total_tokens": 10 + 3 * k}
    return 200, {"id": "c", "model": body["model"], "choices": choices, "usage": usage}, {}


class Server:
    """Records request bodies and the most requests in flight; answers with ``answer``."""

    def __init__(self) -> None:
        self.answer: Answer = completion
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.peak = 0
        self.hold_until = 0
        """Hold each request until this many are in flight at once (or 10 s passed)."""
        self.cond = threading.Condition()
        self.base_url = ""

    def handle(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self.cond:
            self.bodies.append(body)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.peak >= self.hold_until, timeout=10)
        try:
            return self.answer(body)
        finally:
            with self.cond:
                self.in_flight -= 1


@pytest.fixture
def server() -> Iterator[Server]:
    fake = Server()

    sockets: set[socket.socket] = set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def setup(self) -> None:
            super().setup()
            sockets.add(self.connection)

        def finish(self) -> None:
            sockets.discard(self.connection)
            super().finish()

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            status, payload, headers = fake.handle(json.loads(raw))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    class HTTPServer(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # a fan-out connects all at once: no SYN may be dropped

    http = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=http.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    fake.base_url = f"http://127.0.0.1:{http.server_address[1]}/v1"
    try:
        yield fake
    finally:
        http.shutdown()
        http.server_close()
        # Kept-alive connections end with the server: a later test's server may get this
        # port, and a client's pooled connection must not reach this one's handlers.
        for sock in list(sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        forget_endpoint(fake.base_url)


def model(server: Server, **kwargs: Any) -> ChatOpenAICompatible:
    return openai_compatible(server.base_url, "m", max_retries=0, timeout=10, **kwargs)


class Recorder(BaseCallbackHandler):
    """The chat-model runs it saw: (run id, parent run id), and the runs that ended."""

    def __init__(self) -> None:
        self.started: list[tuple[UUID, UUID | None]] = []
        self.ended: list[UUID] = []
        self.chains: list[UUID] = []

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, **kw: Any) -> None:
        self.chains.append(run_id)

    def on_chat_model_start(
        self, serialized: Any, messages: Any, *, run_id: UUID, parent_run_id: UUID | None, **kw: Any
    ) -> None:
        self.started.append((run_id, parent_run_id))

    def on_llm_end(self, response: Any, *, run_id: UUID, **kw: Any) -> None:
        self.ended.append(run_id)


# -- what reaches the server and what comes back ------------------------------------------------


JUDGE_OPTIONS: dict[str, Any] = {
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": {"type": "object"}, "strict": True},
    },
    "logprobs": True,
    "top_logprobs": 5,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "repeat_penalty": 1.1,
}


def test_the_model_is_still_detected_as_taking_a_json_schema(server: Server) -> None:
    assert takes_json_schema(model(server))
    assert takes_json_schema(model(server).bind(temperature=0))


def test_judge_options_reach_the_server_and_logprobs_come_back(server: Server, mode: Mode) -> None:
    judge = model(server, max_tokens=8).bind(**JUDGE_OPTIONS)
    reply = mode.invoke(judge, "Rate this.")
    [body] = server.bodies
    for key, value in JUDGE_OPTIONS.items():
        assert body[key] == value
    assert body["max_tokens"] == 8 and body["model"] == "m" and body["stream"] is False
    assert reply.response_metadata["logprobs"] == logprobs_of("0")
    assert reply.response_metadata["finish_reason"] == "stop"
    assert reply.additional_kwargs["parsed"] == {"score": 0}
    assert reply.usage_metadata["total_tokens"] == 13
    assert reply.id is not None


def test_each_choice_keeps_its_own_logprobs_and_finish_reason(server: Server, mode: Mode) -> None:
    llm = model(server, logprobs=True)
    replies = mode.call(
        lambda: llm.sample_n("Hi", seeds=[1, 2, 3]),
        lambda: llm.asample_n("Hi", seeds=[1, 2, 3]),
    )
    assert [r.response_metadata["logprobs"] for r in replies] == [
        logprobs_of(str(i)) for i in range(3)
    ]
    assert [r.response_metadata["finish_reason"] for r in replies] == ["stop", "length", "stop"]
    assert [body.get("n") for body in server.bodies] == [3]


class Verdict(BaseModel):
    score: int


def test_structured_output_by_a_json_schema_takes_the_lean_path(server: Server, mode: Mode) -> None:
    schema = {"title": "Verdict", "type": "object", "properties": {"score": {"type": "integer"}}}
    structured = model(server).with_structured_output(schema, method="json_schema")
    assert mode.invoke(structured, "Rate this.") == {"score": 0}
    sent = server.bodies[0]["response_format"]["json_schema"]["schema"]
    assert sent["properties"] == schema["properties"]


def test_structured_output_by_a_pydantic_class_is_parsed_by_the_sdk(
    server: Server, mode: Mode
) -> None:
    structured = model(server).with_structured_output(Verdict, method="json_schema")
    assert mode.invoke(structured, "Rate this.") == Verdict(score=0)
    assert server.bodies[0]["response_format"]["type"] == "json_schema"


# -- errors -------------------------------------------------------------------------------------


def test_statuses_raise_langchain_openais_exception_classes(server: Server, mode: Mode) -> None:
    error = {"error": {"message": "slow down", "type": "rate_limit", "param": None}}
    server.answer = lambda body: (429, error, {"Retry-After": "7"})
    with pytest.raises(openai.RateLimitError) as caught:
        mode.invoke(model(server), "Hi")
    assert type(caught.value).__name__ == "OpenAIRateLimitError"
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.message.startswith("Error code: 429")

    bad = {"error": {"message": "'n' must be 1", "type": "invalid", "param": "n"}}
    server.answer = lambda body: (400, bad, {})
    with pytest.raises(openai.BadRequestError) as rejected:
        mode.invoke(model(server), "Hi")
    assert rejected.value.param == "n"


def test_max_retries_retries_a_server_error_like_the_sdk(server: Server, mode: Mode) -> None:
    answers = iter([(500, {"error": {"message": "boom"}}, {"retry-after-ms": "10"})])
    server.answer = lambda body: next(answers, None) or completion(body)
    reply = mode.invoke(model(server).model_copy(update={"max_retries": 1}), "Hi")
    assert reply.text == '{"score": 0}'
    assert len(server.bodies) == 2


def test_a_json_answer_that_is_not_an_object_raises_type_error(server: Server, mode: Mode) -> None:
    server.answer = lambda body: (200, "not an object", {})  # type: ignore[return-value,arg-type]
    with pytest.raises(TypeError):
        mode.invoke(model(server), "Hi")


# -- callbacks ----------------------------------------------------------------------------------


def test_without_a_handler_no_callback_run_is_made(
    server: Server, mode: Mode, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the callback path ran although nobody listens")

    for name in ("generate", "agenerate", "generate_prompt", "agenerate_prompt"):
        monkeypatch.setattr(BaseChatModel, name, forbidden)
    llm = model(server, supports_n=False)
    assert mode.invoke(llm, "Hi").text == '{"score": 0}'
    replies = mode.call(
        lambda: llm.sample_n("Hi", seeds=[1, 2]), lambda: llm.asample_n("Hi", seeds=[1, 2])
    )
    assert all(not isinstance(r, Exception) for r in replies)


def test_with_a_handler_every_request_is_a_run_nested_in_its_parent(
    server: Server, mode: Mode
) -> None:
    llm = model(server, supports_n=False)

    def step(question: str) -> Any:
        llm.invoke(question)
        return llm.sample_n(question, seeds=[1, 2])

    async def astep(question: str) -> Any:
        await llm.ainvoke(question)
        return await llm.asample_n(question, seeds=[1, 2])

    recorder = Recorder()
    mode.invoke(RunnableLambda(step, afunc=astep), "Hi", {"callbacks": [recorder]})
    [parent] = recorder.chains
    assert len(recorder.started) == 3  # the invoke and the two separate requests
    assert all(p == parent for _, p in recorder.started)
    assert sorted(map(str, recorder.ended)) == sorted(str(run) for run, _ in recorder.started)


# -- parallelism and connections ------------------------------------------------------------------


def test_separate_requests_of_a_fan_out_are_all_in_flight_at_once(
    server: Server, mode: Mode
) -> None:
    server.hold_until = 16
    llm = model(server, supports_n=False)
    seeds = list(range(16))
    replies = mode.call(
        lambda: llm.sample_n("Hi", seeds=seeds), lambda: llm.asample_n("Hi", seeds=seeds)
    )
    assert all(not isinstance(r, Exception) for r in replies)
    assert server.peak == 16


def test_each_event_loop_has_its_own_connections_closed_at_shutdown(server: Server) -> None:
    llm = model(server)
    loops: list[asyncio.AbstractEventLoop] = []
    sessions = []

    async def call() -> str:
        text = (await llm.ainvoke("Hi")).text
        loops.append(asyncio.get_running_loop())
        sessions.append(loop_clients.LOOPS[loops[-1]].session)  # this loop's own
        return text

    for _ in range(3):
        assert asyncio.run(call()) == '{"score": 0}'
    assert len({id(s) for s in sessions}) == 3
    assert all(s is not None and s.closed for s in sessions)
    assert not [loop for loop in loops if loop in loop_clients.LOOPS]


def test_a_loop_closed_without_shutting_down_is_dropped_quietly(
    server: Server, recwarn: pytest.WarningsRecorder
) -> None:
    llm = model(server)
    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(llm.ainvoke("Hi")).text == '{"score": 0}'
    session = loop_clients.LOOPS[loop].session
    loop.close()  # no shutdown_asyncgens: its entry waits for the next loop to drop it
    assert asyncio.run(llm.ainvoke("Hi")).text == '{"score": 0}'
    assert loop not in loop_clients.LOOPS
    assert session is not None and session.closed  # so it does not warn when collected
    del session
    gc.collect()
    assert not [w for w in recwarn if "Unclosed client session" in str(w.message)]


@pytest.mark.parametrize(
    ("options", "call", "lean"),
    [
        ({}, {}, True),
        ({}, {"stream": True}, False),
        ({"include_response_headers": True}, {}, False),
        ({"openai_proxy": "http://127.0.0.1:3128"}, {}, False),
        ({}, {"response_format": Verdict}, False),
    ],
)
def test_what_takes_the_lean_path(
    options: dict[str, Any], call: dict[str, Any], lean: bool
) -> None:
    llm = ChatOpenAICompatible(base_url="http://127.0.0.1:9/v1", model="m", api_key="k", **options)
    payload = llm._get_request_payload([("user", "Hi")], **call)
    assert (llm._lean_request(payload) is not None) is lean


def test_the_sdk_sends_what_has_no_base_url_or_goes_through_a_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    default = ChatOpenAICompatible(model="m", api_key="k")
    assert default._lean_request(default._get_request_payload([("user", "Hi")])) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    remote = ChatOpenAICompatible(base_url="https://api.example.com/v1", model="m", api_key="k")
    assert remote._lean_request(remote._get_request_payload([("user", "Hi")])) is None
    local = ChatOpenAICompatible(base_url="http://127.0.0.1:9/v1", model="m", api_key="k")
    assert local._lean_request(local._get_request_payload([("user", "Hi")])) is not None


def test_a_streaming_models_sdk_copies_are_closed_with_their_loop() -> None:
    with FakeOpenAI() as fake:
        llm = openai_compatible(fake.base_url, "fake", streaming=True, max_retries=0, timeout=10)
        loops: list[asyncio.AbstractEventLoop] = []

        async def call() -> str:
            text = (await llm.ainvoke("Hi")).text
            loops.append(asyncio.get_running_loop())
            assert loop_clients.LOOPS[loops[-1]].copies  # this loop's own copy
            return text

        for _ in range(3):
            assert asyncio.run(call()) == reply_text(None, 0)
        assert [r.stream for r in fake.requests] == [True] * 3
        assert not [loop for loop in loops if loop in loop_clients.LOOPS]
        for _ in range(200):
            if fake.open_connections == 0:
                break
            threading.Event().wait(0.01)
        assert fake.open_connections == 0
        forget_endpoint(fake.base_url)


def test_a_servers_own_option_is_sent_by_the_sdk_too(mode: Mode) -> None:
    # llama.cpp's repeat_penalty is no field of the SDK's: the lean path sends the body as it
    # is, and a stream (through the SDK) now sends it in extra_body instead of raising.
    with FakeOpenAI() as fake:
        llm = openai_compatible(fake.base_url, "fake", max_retries=0, timeout=10)
        options = llm.bind(repeat_penalty=1.1)
        assert mode.invoke(options, "Hi").text == reply_text(None, 0)
        streamed = mode.call(
            lambda: "".join(c.text for c in options.stream("Hi")),
            lambda: _joined(options.astream("Hi")),
        )
        assert streamed == reply_text(None, 0)
        assert [(r.stream, r.body.get("repeat_penalty")) for r in fake.requests] == [
            (False, 1.1),
            (True, 1.1),
        ]


async def _joined(chunks: Any) -> str:
    return "".join([c.text async for c in chunks])
