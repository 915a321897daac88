"""The minimal HTTP/1.1 client (:mod:`fusion_graph.integrations.http1`) against raw loopback
servers: answers with a Content-Length, chunked, or ending with the connection; keep-alive
reuse; an idle connection the server closed; a truncated answer; a timeout that closes the
connection."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fusion_graph.integrations.http1 import AsyncOrigin, Origin, ProtocolError, SyncOrigin
from tests.conftest import Mode

Reply = Callable[[int], bytes | None]
"""The raw bytes to answer the n-th request of a connection with (None: close it)."""


def content_length(_: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Thing: yes\r\n\r\nhello"


def chunked(_: int) -> bytes:
    return (
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\n\r\n"
    )


def close_delimited(_: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello"


class RawServer:
    """Answers each request (read up to its body) with ``reply``; counts connections."""

    def __init__(self, reply: Reply, tls: ssl.SSLContext | None = None) -> None:
        self.reply = reply
        self.tls = tls
        self.close_after: int | None = None
        """Close each connection after this many answers (without saying so)."""
        self.connections = 0
        self.open: set[socket.socket] = set()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            with contextlib.suppress(OSError):
                conn = self.tls.wrap_socket(conn, server_side=True)
        with conn, contextlib.suppress(OSError):  # the client (or close()) ended it
            buffer = b""
            count = 0
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
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


def post_twice(mode: Mode, server: RawServer, timeout_s: float = 5.0) -> list[tuple[int, bytes]]:
    origin = Origin.of(f"http://127.0.0.1:{server.port}/v1")

    def sync() -> list[tuple[int, bytes]]:
        client = SyncOrigin(origin)
        replies = [client.post("/v1/x", {}, b"{}", timeout_s=timeout_s) for _ in range(2)]
        client.close()
        return [(r.status, r.body) for r in replies]

    async def run() -> list[tuple[int, bytes]]:
        client = AsyncOrigin(origin)
        replies = [await client.post("/v1/x", {}, b"{}", timeout_s=timeout_s) for _ in range(2)]
        client.close()
        return [(r.status, r.body) for r in replies]

    return mode.call(sync, run)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("reply", "status", "connections"),
    [(content_length, 200, 1), (chunked, 201, 1), (close_delimited, 200, 2)],
)
def test_answers_are_read_whole_and_connections_kept_alive_when_allowed(
    serve: Callable[[Reply], RawServer], mode: Mode, reply: Reply, status: int, connections: int
) -> None:
    server = serve(reply)
    assert post_twice(mode, server) == [(status, b"hello")] * 2
    assert server.connections == connections


def test_an_idle_connection_the_server_closed_is_not_reused(
    serve: Callable[[Reply], RawServer], mode: Mode
) -> None:
    server = serve(content_length)
    server.close_after = 1
    origin = Origin.of(f"http://127.0.0.1:{server.port}/")

    def sync() -> list[bytes]:
        client = SyncOrigin(origin)
        first = client.post("/", {}, b"", timeout_s=5).body
        threading.Event().wait(0.05)  # the server has closed the connection meanwhile
        return [first, client.post("/", {}, b"", timeout_s=5).body]

    async def run() -> list[bytes]:
        client = AsyncOrigin(origin)
        first = (await client.post("/", {}, b"", timeout_s=5)).body
        await asyncio.sleep(0.05)
        return [first, (await client.post("/", {}, b"", timeout_s=5)).body]

    assert mode.call(sync, run) == [b"hello", b"hello"]
    assert server.connections == 2


def test_a_truncated_answer_is_a_connection_error(
    serve: Callable[[Reply], RawServer], mode: Mode
) -> None:
    server = serve(
        lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nConnection: close\r\n\r\nhi"
    )
    with pytest.raises(ConnectionError) as caught:
        post_twice(mode, server)
    assert isinstance(caught.value, ProtocolError | ConnectionError)


def test_a_timeout_closes_the_connection(serve: Callable[[Reply], RawServer], mode: Mode) -> None:
    gate = threading.Event()

    def slow(n: int) -> bytes:
        gate.wait(5)
        return content_length(n)

    server = serve(slow)
    try:
        with pytest.raises(TimeoutError):
            post_twice(mode, server, timeout_s=0.05)
    finally:
        gate.set()


@pytest.fixture
def tls_server(tmp_path: Any) -> Iterator[tuple[RawServer, ssl.SSLContext]]:
    """A RawServer behind TLS with a self-signed certificate for 127.0.0.1, and a client
    context that trusts it (skipped without the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = [
        *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
        *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
        *("-keyout", str(key), "-out", str(cert)),
    ]
    subprocess.run(command, check=True, capture_output=True)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    server = RawServer(content_length, server_side)
    client_side = ssl.create_default_context(cafile=str(cert))
    try:
        yield server, client_side
    finally:
        server.close()


def test_https_origins_speak_tls(tls_server: tuple[RawServer, ssl.SSLContext], mode: Mode) -> None:
    server, context = tls_server
    origin = Origin.of(f"https://127.0.0.1:{server.port}/v1")

    def sync() -> list[bytes]:
        client = SyncOrigin(origin, context)
        replies = [client.post("/v1/x", {}, b"{}", timeout_s=5).body for _ in range(2)]
        client.close()
        return replies

    async def run() -> list[bytes]:
        client = AsyncOrigin(origin, context)
        replies = [(await client.post("/v1/x", {}, b"{}", timeout_s=5)).body for _ in range(2)]
        client.close()
        return replies

    assert mode.call(sync, run) == [b"hello", b"hello"]
    assert server.connections == 1
