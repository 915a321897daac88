"""A fake OpenAI-compatible chat-completions server on loopback that fails on purpose.

:class:`FakeOpenAI` is a real HTTP/1.1 server (the stdlib's, one thread per connection) on
``127.0.0.1`` and a free port. Per request, the first of its rules whose predicate matches
decides how the request fails (:class:`Fault`); a request no rule matches is answered
normally. The faults:

* :meth:`Fault.status`: an error status with an OpenAI error body, and a ``Retry-After``
  header when asked (:meth:`Fault.too_many_requests` is 429 with one);
* :meth:`Fault.malformed_json`: 200 with a body that is not JSON (for ``stream: true``, an
  SSE event whose data is not JSON);
* :meth:`Fault.truncated`: the connection closes in the middle of the body (for ``stream:
  true``, after the first SSE events, before ``[DONE]`` and the chunked body's end);
* :meth:`Fault.slow_first_byte`: nothing is sent for ``delay_s`` seconds, then the normal
  answer; a client that gives up meanwhile is noticed (the request stops being in flight);
* :meth:`Fault.connection_reset`: the connection is reset (RST) without an answer.

Predicates (``Rule``) see a :class:`Request`: :func:`every_other`, :func:`odd_seed`,
:func:`multi_sample` (the ``n > 1`` request), :func:`first_attempt`, :func:`candidate`,
combined with :func:`all_of` / :func:`any_of`, or any ``Callable[[Request], bool]``.

The server honours ``n`` (``n`` choices) or ignores it (one choice, like llama.cpp's
server) by configuration, records every request (seed, ``n``, stream, attempt, arrival
time, the fault it got) and counts requests received and requests in flight. A request
stops being in flight just before its last byte is sent (or the connection is reset, or the
client is seen to have gone), so once a client has its whole answer the count already says
so: a test can assert ``in_flight == 0`` right after a run (:meth:`FakeOpenAI.wait_idle`
allows for a client that gave up, which the server notices within ~10 ms).

Example::

    with FakeOpenAI() as server:
        server.configure(honour_n=False, rules=[(odd_seed, Fault.status(500))])
        llm = openai_compatible(server.base_url, "fake", max_retries=0)
        ...
        assert server.wait_idle() and server.received == 9
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, TypeVar

__all__ = [
    "Fault",
    "FakeOpenAI",
    "Request",
    "Rule",
    "all_of",
    "any_of",
    "candidate",
    "every_other",
    "first_attempt",
    "multi_sample",
    "odd_seed",
    "reply_text",
]

K = TypeVar("K")

PROMPT_TOKENS = 12
COMPLETION_TOKENS = 6
"""Per choice."""


@dataclass(frozen=True)
class Request:
    """One chat-completions request as the server received it."""

    index: int
    """Arrival order, from 0."""
    seed: int | None
    n: int
    stream: bool
    attempt: int
    """1 + the earlier requests with the same seed, ``n`` and ``stream`` (a retry is 2)."""
    prompt: str
    """The messages' contents, joined by newlines."""
    received_at: float
    """``time.monotonic()`` at arrival."""
    body: dict[str, Any] = field(repr=False)


Rule = Callable[[Request], bool]
"""A predicate over a request: whether a fault applies to it."""


def every_other(request: Request) -> bool:
    """Every other request, by arrival: the 2nd, 4th, ..."""
    return request.index % 2 == 1


def odd_seed(request: Request) -> bool:
    """Requests whose seed is odd (a request without a seed, e.g. a fusor's, is not)."""
    return request.seed is not None and request.seed % 2 == 1


def multi_sample(request: Request) -> bool:
    """The ``n > 1`` request."""
    return request.n > 1


def first_attempt(request: Request) -> bool:
    """The first attempt of each request (its retries are answered normally)."""
    return request.attempt == 1


def candidate(request: Request) -> bool:
    """A request carrying a seed: the candidates of a fan-out (fusors and judges have none)."""
    return request.seed is not None


def all_of(*rules: Rule) -> Rule:
    """A rule matching when every one of ``rules`` does."""
    return lambda request: all(rule(request) for rule in rules)


def any_of(*rules: Rule) -> Rule:
    """A rule matching when any one of ``rules`` does."""
    return lambda request: any(rule(request) for rule in rules)


FaultKind = Literal["status", "malformed_json", "truncated", "slow_first_byte", "reset"]


@dataclass(frozen=True)
class Fault:
    """How a request fails (build one with the class methods)."""

    kind: FaultKind
    status_code: int = 500
    retry_after: float | None = None
    delay_s: float = 0.0

    @classmethod
    def status(cls, code: int = 500, *, retry_after: float | None = None) -> Fault:
        """Answer with HTTP ``code`` (and ``Retry-After: retry_after`` when given)."""
        return cls("status", status_code=code, retry_after=retry_after)

    @classmethod
    def too_many_requests(cls, retry_after: float = 1.0) -> Fault:
        """429 with ``Retry-After``."""
        return cls.status(429, retry_after=retry_after)

    @classmethod
    def malformed_json(cls) -> Fault:
        return cls("malformed_json")

    @classmethod
    def truncated(cls) -> Fault:
        return cls("truncated")

    @classmethod
    def slow_first_byte(cls, delay_s: float) -> Fault:
        return cls("slow_first_byte", delay_s=delay_s)

    @classmethod
    def connection_reset(cls) -> Fault:
        return cls("reset")

    @property
    def name(self) -> str:
        return str(self.status_code) if self.kind == "status" else self.kind


def reply_text(seed: int | None, choice: int) -> str:
    """The text of a normal answer: a line naming the request, then a final answer that a
    majority vote counts as the same for every candidate ("42")."""
    if seed is None:
        return "The fused answer is 42."
    return f"Candidate for seed {seed}, choice {choice}.\nThe answer is 42."


@dataclass
class _Record:
    request: Request
    fault: str | None = None
    """The fault's name, or None for a normal answer."""
    done: bool = False
    outcome: str = "pending"
    """ok, a fault's name, or abandoned (the client went away first)."""


class FakeOpenAI:
    """The server (see the module docs). Start it with :meth:`start` (or ``with``), stop it
    with :meth:`stop`; :meth:`configure` resets the rules and the records between tests."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.honour_n = True
        self.rules: list[tuple[Rule, Fault]] = []
        self._records: list[_Record] = []
        self._in_flight = 0
        self._peak = 0
        self._connections = 0
        self._hurry = threading.Event()
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        handler = type("Handler", (_Handler,), {"fake": self})
        http = _Server(("127.0.0.1", 0), handler)
        self._http = http
        self._thread = threading.Thread(
            target=http.serve_forever, args=(0.01,), name="fake-openai", daemon=True
        )
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{http.server_address[1]}/v1"
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(
        self, *, honour_n: bool = True, rules: Iterable[tuple[Rule, Fault]] = ()
    ) -> FakeOpenAI:
        """New behaviour, and the records and peak cleared (requests still in flight stay
        counted)."""
        with self._cond:
            self.honour_n = honour_n
            self.rules = list(rules)
            self._records = []
            self._peak = self._in_flight
            self._hurry.clear()
        return self

    def hurry(self) -> None:
        """Answer every slow first byte now (until :meth:`configure`): a test that found a
        request left in flight can end it instead of waiting out the delay."""
        self._hurry.set()

    # -- what happened --------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        with self._cond:
            return [r.request for r in self._records]

    @property
    def faults(self) -> list[str | None]:
        """Per request (arrival order), the fault it got, or None."""
        with self._cond:
            return [r.fault for r in self._records]

    @property
    def outcomes(self) -> list[str]:
        with self._cond:
            return [r.outcome for r in self._records]

    @property
    def received(self) -> int:
        """Requests received since :meth:`configure`."""
        with self._cond:
            return len(self._records)

    @property
    def in_flight(self) -> int:
        """Requests received and not yet answered (nor abandoned by their client)."""
        with self._cond:
            return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        with self._cond:
            return self._peak

    @property
    def open_connections(self) -> int:
        with self._cond:
            return self._connections

    def wait_idle(self, timeout_s: float = 5.0) -> bool:
        """Whether no request is in flight, waiting up to ``timeout_s`` for the server to
        notice clients that gave up (a request still in flight after that is a leak)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout=timeout_s)

    def attempts(self, key: Callable[[Request], K]) -> dict[K, list[Request]]:
        """The requests grouped by ``key`` (e.g. by seed), each group in arrival order."""
        groups: dict[K, list[Request]] = {}
        for request in self.requests:
            groups.setdefault(key(request), []).append(request)
        return groups

    # -- the server side ------------------------------------------------------------------

    def _receive(self, body: dict[str, Any]) -> tuple[_Record, Fault | None]:
        messages = body.get("messages") or []
        prompt = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        seed = body.get("seed")
        n = int(body.get("n") or 1)
        stream = bool(body.get("stream"))
        with self._cond:
            attempt = 1 + sum(
                1
                for r in self._records
                if (r.request.seed, r.request.n, r.request.stream) == (seed, n, stream)
            )
            request = Request(
                index=len(self._records),
                seed=seed,
                n=n,
                stream=stream,
                attempt=attempt,
                prompt=prompt,
                received_at=time.monotonic(),
                body=body,
            )
            fault = next((f for rule, f in self.rules if rule(request)), None)
            record = _Record(request, fault.name if fault else None)
            self._records.append(record)
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
            self._cond.notify_all()
        return record, fault

    def _finish(self, record: _Record, outcome: str) -> None:
        """The request stops being in flight (once)."""
        with self._cond:
            if record.done:
                return
            record.done = True
            record.outcome = outcome
            self._in_flight -= 1
            self._cond.notify_all()

    def _connection(self, delta: int) -> None:
        with self._cond:
            self._connections += delta

    def _choices(self, request: Request) -> list[dict[str, Any]]:
        k = request.n if self.honour_n else 1
        return [
            {
                "index": i,
                "message": {"role": "assistant", "content": reply_text(request.seed, i)},
                "finish_reason": "stop",
                "logprobs": None,
            }
            for i in range(k)
        ]

    def _completion(self, request: Request) -> dict[str, Any]:
        choices = self._choices(request)
        completion = COMPLETION_TOKENS * len(choices)
        return {
            "id": f"chatcmpl-{request.index}",
            "object": "chat.completion",
            "created": 0,
            "model": request.body.get("model", "fake"),
            "choices": choices,
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": completion,
                "total_tokens": PROMPT_TOKENS + completion,
            },
        }

    def _events(self, request: Request) -> list[dict[str, Any]]:
        """The SSE events of a streamed answer (without ``[DONE]``)."""
        base = {
            "id": f"chatcmpl-{request.index}",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": request.body.get("model", "fake"),
        }
        events: list[dict[str, Any]] = []
        for choice in self._choices(request):
            i = choice["index"]
            text = choice["message"]["content"]
            half = len(text) // 2
            for delta in ({"role": "assistant", "content": ""}, {"content": text[:half]}):
                events.append({**base, "choices": [{"index": i, "delta": delta}]})
            events.append({**base, "choices": [{"index": i, "delta": {"content": text[half:]}}]})
            events.append({**base, "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]})
        options = request.body.get("stream_options") or {}
        if options.get("include_usage"):
            completion = COMPLETION_TOKENS * len(self._choices(request))
            usage = {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": completion,
                "total_tokens": PROMPT_TOKENS + completion,
            }
            events.append({**base, "choices": [], "usage": usage})
        return events


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a fan-out of 64 connects at once
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # a client that reset its connection (e.g. at exit) is not the test's concern


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"
    # The head and the body go out in two writes: with Nagle's algorithm on, the body waits
    # for the client's delayed ACK, ~40 ms on every answer of a kept-alive connection.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        return

    def setup(self) -> None:
        super().setup()
        self.fake._connection(+1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.fake._connection(-1)

    def do_GET(self) -> None:
        self._send_json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send_json(404, _error("not found", "not_found_error"))
            return
        body = json.loads(raw)
        record, fault = self.fake._receive(body)
        try:
            self._answer(record, fault)
        except OSError:  # the client went away mid-answer
            self.close_connection = True
        finally:
            self.fake._finish(record, "abandoned")  # no-op when already finished

    # -- answers --------------------------------------------------------------------------

    def _answer(self, record: _Record, fault: Fault | None) -> None:
        request = record.request
        if fault is not None and fault.kind == "slow_first_byte":
            if not self._wait_while_connected(fault.delay_s):
                self.fake._finish(record, "abandoned")
                self.close_connection = True
                return
            fault = None  # then the normal answer
        outcome = fault.name if fault is not None else "ok"
        if fault is None:
            if request.stream:
                self._send_stream(record, outcome, self.fake._events(request), done=True)
            else:
                self._send_json(200, self.fake._completion(request), record, outcome)
        elif fault.kind == "status":
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            kind = "rate_limit_error" if fault.status_code == 429 else "server_error"
            error = _error(f"injected {fault.status_code}", kind)
            self._send_json(fault.status_code, error, record, outcome, headers)
        elif fault.kind == "malformed_json":
            if request.stream:
                self._send_stream(record, outcome, [], done=False, raw=[b'{"id": "chatcmpl-x", '])
            else:
                data = b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{'
                self._send_bytes(200, data, "application/json", record, outcome)
        elif fault.kind == "truncated":
            if request.stream:
                events = self.fake._events(request)[:2]
                self._send_stream(record, outcome, events, done=False, cut=True)
            else:
                data = json.dumps(self.fake._completion(request)).encode()
                self._send_head(200, "application/json", len(data))
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.fake._finish(record, outcome)
                self._reset()
        elif fault.kind == "reset":
            self.fake._finish(record, outcome)
            self._reset()

    def _send_head(
        self,
        status: int,
        content_type: str,
        length: int | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _send_bytes(
        self,
        status: int,
        data: bytes,
        content_type: str,
        record: _Record | None = None,
        outcome: str = "ok",
        headers: dict[str, str] | None = None,
    ) -> None:
        self._send_head(status, content_type, len(data), headers)
        self.wfile.flush()
        if record is not None:
            self.fake._finish(record, outcome)  # before the last byte: see the module docs
        self.wfile.write(data)
        self.wfile.flush()

    def _send_json(
        self,
        status: int,
        payload: dict[str, Any],
        record: _Record | None = None,
        outcome: str = "ok",
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(payload).encode()
        self._send_bytes(status, data, "application/json", record, outcome, headers)

    def _send_stream(
        self,
        record: _Record,
        outcome: str,
        events: Sequence[dict[str, Any]],
        *,
        done: bool,
        cut: bool = False,
        raw: Sequence[bytes] = (),
    ) -> None:
        """An SSE answer in chunked encoding. ``done``: ``[DONE]`` and the body's end;
        ``cut``: the connection is reset after ``events`` instead; ``raw``: data lines
        written as they are (malformed events), then the body ends."""
        self._send_head(200, "text/event-stream", None)
        chunks = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
        chunks += [b"data: " + r + b"\n\n" for r in raw]
        if done:
            chunks.append(b"data: [DONE]\n\n")
        for chunk in chunks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        self.fake._finish(record, outcome)
        if cut:
            self._reset()
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _reset(self) -> None:
        """Reset the connection (RST, not FIN)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _wait_while_connected(self, delay_s: float) -> bool:
        """Sleep ``delay_s``; False as soon as the client closes its end."""
        deadline = time.monotonic() + delay_s
        while (left := deadline - time.monotonic()) > 0 and not self.fake._hurry.is_set():
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.01))
            if readable:
                try:
                    peek = self.connection.recv(1, socket.MSG_PEEK)
                except OSError:
                    return False
                if not peek:
                    return False
                time.sleep(min(left, 0.01))  # data (a pipelined request): keep waiting
        return True


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
