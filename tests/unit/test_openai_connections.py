"""The lean request path's connections (aiohttp, one session per event loop) against raw
loopback servers, through ``ChatOpenAICompatible``, sync and async: answers read whole
(``Content-Length`` or chunked), keep-alive reuse, an idle connection the server closed, a
truncated answer, and a timeout that closes the connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import openai
import pytest

from fusion_graph.integrations.openai_compat import ChatOpenAICompatible, openai_compatible
from tests.conftest import Mode

Reply = Callable[[int], bytes | None]
"""The raw bytes to answer the n-th request of a connection with (None: close it)."""

COMPLETION = json.dumps(
    {
        "id": "c",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }
        ],
    }
).encode()


def content_length(_: int) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(COMPLETION)}\r\n\r\n"
    return head.encode() + COMPLETION


def chunked(_: int) -> bytes:
    half = len(COMPLETION) // 2
    parts = [COMPLETION[:half], COMPLETION[half:]]
    body = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body


def close_delimited(_: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + COMPLETION


class RawServer:
    """Answers each request (read up to its body) with ``reply``; counts connections and
    notes when a connection is closed by the client."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.close_after: int | None = None
        """Close each connection after this many answers (without saying so)."""
        self.connections = 0
        self.connected = threading.Event()
        self.client_closed = threading.Event()
        self.open: set[socket.socket] = set()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.connected.set()
            self.open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client (or close()) ended it
            buffer = b""
            count = 0
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        self.client_closed.set()
                        return
                    buffer += data
                head, _, rest = buffer.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(rest) < length:
                    rest += conn.recv(65536)
                buffer = rest[length:]
                answer = self.reply(count)
                count += 1
                if answer is None:
                    return
                conn.sendall(answer)
                if b"Connection: close" in answer or count == self.close_after:
                    return

    def close(self) -> None:
        """Stop listening (waking the accepting thread) and end every connection."""
        for sock in [self.sock, *self.open]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Reply], RawServer]]:
    servers: list[RawServer] = []

    def start(reply: Reply) -> RawServer:
        servers.append(RawServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def model(server: RawServer, timeout: float = 5.0) -> ChatOpenAICompatible:
    return openai_compatible(server.base_url, "m", max_retries=0, timeout=timeout)


def ask_twice(mode: Mode, llm: ChatOpenAICompatible, pause_s: float = 0.0) -> list[str]:
    """Two requests, one after the other, from one event loop (async) or from the sync API's
    background loop (sync)."""

    def sync() -> list[str]:
        first = llm.invoke("Hi").text
        threading.Event().wait(pause_s)
        return [first, llm.invoke("Hi").text]

    async def run() -> list[str]:
        first = (await llm.ainvoke("Hi")).text
        await asyncio.sleep(pause_s)
        return [first, (await llm.ainvoke("Hi")).text]

    return mode.call(sync, run)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("reply", "connections"), [(content_length, 1), (chunked, 1), (close_delimited, 2)]
)
def test_answers_are_read_whole_and_connections_kept_alive_when_allowed(
    serve: Callable[[Reply], RawServer], mode: Mode, reply: Reply, connections: int
) -> None:
    server = serve(reply)
    assert ask_twice(mode, model(server)) == ["hello", "hello"]
    assert server.connections == connections


def test_an_idle_connection_the_server_closed_is_not_reused(
    serve: Callable[[Reply], RawServer], mode: Mode
) -> None:
    server = serve(content_length)
    server.close_after = 1  # and says nothing: the client sees the close while idle
    assert ask_twice(mode, model(server), pause_s=0.05) == ["hello", "hello"]
    assert server.connections == 2


def test_a_truncated_answer_is_a_connection_error(
    serve: Callable[[Reply], RawServer], mode: Mode
) -> None:
    server = serve(
        lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\nConnection: close\r\n\r\n{}"
    )
    with pytest.raises(openai.APIConnectionError):
        ask_twice(mode, model(server))


def test_a_timeout_closes_the_connection(serve: Callable[[Reply], RawServer], mode: Mode) -> None:
    gate = threading.Event()

    def slow(n: int) -> bytes:
        gate.wait(5)
        return content_length(n)

    server = serve(slow)
    try:
        with pytest.raises(openai.APITimeoutError):
            ask_twice(mode, model(server, timeout=0.05))
    finally:
        gate.set()
    # The late answer is written, then the server reads on: a connection kept for reuse
    # would leave it waiting for the next request; a closed one ends its read.
    assert server.client_closed.wait(2), "the client kept the timed-out connection"


def test_a_cancelled_request_closes_its_connection(serve: Callable[[Reply], RawServer]) -> None:
    # What a run's per-attempt timeout does to a candidate (sync runs too: they await this
    # model's ainvoke on their event loop).
    gate = threading.Event()

    def slow(n: int) -> bytes:
        gate.wait(5)
        return content_length(n)

    server = serve(slow)
    llm = model(server)

    async def cancelled() -> None:
        task = asyncio.ensure_future(llm.ainvoke("Hi"))
        assert await asyncio.to_thread(server.connected.wait, 2)
        await asyncio.sleep(0.05)  # the request is sent and waits for its answer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        # Still on the loop, whose session would keep a connection it meant to reuse.
        closed = await asyncio.to_thread(server.client_closed.wait, 2)
        assert closed, "the client kept the cancelled request's connection"

    try:
        asyncio.run(cancelled())
    finally:
        gate.set()


def test_a_script_that_made_sync_calls_exits_without_unclosed_clients(
    serve: Callable[[Reply], RawServer],
) -> None:
    # A blocking invoke sends from the sync API's background loop, which lives as long as the
    # process: at exit it is shut down like asyncio.run's, so aiohttp's session is closed
    # rather than reported "Unclosed client session" while the interpreter ends.
    server = serve(content_length)
    script = (
        "from fusion_graph.integrations.openai_compat import openai_compatible\n"
        f"llm = openai_compatible({server.base_url!r}, 'm', max_retries=0, timeout=5)\n"
        "print(llm.invoke('Hi').text)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "hello"), done.stderr
    assert "Unclosed" not in done.stderr, done.stderr
    assert server.client_closed.wait(2), "the connection was not closed at exit"
