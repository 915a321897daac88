"""A minimal HTTP/1.1 client for the JSON requests fusion-graph sends in bulk to one server.

A fan-out of 64 candidates, then 64 judge calls, is 128 small POSTs to one origin within a
few milliseconds. A general-purpose client spends 0.6-4 ms of CPU on each (httpx's pool
gets slower the more connections it holds); this one spends about a tenth of that, because
it does only what these requests need: keep-alive connections to one origin (TLS when the
URL is https), a ``Content-Length`` or chunked answer, a whole-request timeout.

:class:`AsyncOrigin` serves one event loop (asyncio protocol, no streams); :class:`SyncOrigin`
serves every thread (``http.client`` connections in a shared idle list). Both return a
:class:`HttpReply` for any status; what a status means is the caller's business. A request
is sent once: an idle connection the server has closed (or written to) is dropped before it
is reused, and a connection that fails mid-request is an error for the caller's retry policy
(a request the server may have received is never re-sent behind its back). A cancelled or
timed-out request closes its connection, so the server sees the client go.

No proxies, no redirects, no compression, no HTTP/2: callers use a full client for those.
"""

from __future__ import annotations

import asyncio
import http.client
import select
import ssl
import threading
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

__all__ = ["AsyncOrigin", "HttpReply", "Origin", "ProtocolError", "SyncOrigin"]


class ProtocolError(ConnectionError):
    """The connection closed, or the server broke HTTP/1.1, before a whole answer arrived."""

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered
        """Whether any byte of the answer had arrived (then the request is not re-sent)."""


@dataclass(frozen=True, slots=True)
class HttpReply:
    """A whole answer: status, headers (names in lower case) and body."""

    status: int
    headers: dict[str, str]
    body: bytes


class Origin(NamedTuple):
    """Scheme, host and port of a URL: what one connection can serve."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            msg = f"not an http(s) URL: {url!r}"
            raise ValueError(msg)
        return cls(scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def request_head(origin: Origin, target: str, headers: dict[str, str], length: int) -> bytes:
    """The request line and headers of a POST of ``length`` body bytes."""
    lines = [f"POST {target} HTTP/1.1", f"Host: {origin.host_header}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- async ------------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection: parses one answer at a time into a future."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[HttpReply] | None = None
        self.buffer = bytearray()
        self.closed = False
        self.reusable = True
        self.answered = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.length: int | None = None
        self.chunked = False
        self.body = bytearray()
        self.in_body = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if self.in_body and self.length is None and not self.chunked:
                self._done()  # a body that ends with the connection
                return
            error = ProtocolError(
                f"the server closed the connection ({exc or 'EOF'})", answered=self.answered
            )
            self.waiter.set_exception(error)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.closed = True  # bytes nobody asked for: this connection is unusable
            if self.transport is not None:
                self.transport.close()
            return
        self.answered = True
        self.buffer += data
        try:
            self._parse()
        except (ValueError, ProtocolError) as exc:
            self.reusable = False
            if not self.waiter.done():
                self.waiter.set_exception(ProtocolError(f"malformed answer: {exc}", answered=True))
            if self.transport is not None:
                self.transport.close()

    # parsing

    def _parse(self) -> None:
        if not self.in_body:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            del self.buffer[: end + 4]
            version, _, rest = head[0].partition(" ")
            self.status = int(rest[:3])
            for line in head[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            if version != "HTTP/1.1" or "close" in self.headers.get("connection", "").lower():
                self.reusable = False
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                self.chunked = True
            elif "content-length" in self.headers:
                self.length = int(self.headers["content-length"])
            elif self.status in (204, 304) or 100 <= self.status < 200:
                self.length = 0
            else:
                self.reusable = False  # the body ends with the connection
            self.in_body = True
        if self.chunked:
            self._parse_chunks()
        elif self.length is not None and len(self.buffer) >= self.length:
            self.body += self.buffer[: self.length]
            del self.buffer[: self.length]
            self._done()
        elif self.length is None:
            self.body += self.buffer
            self.buffer.clear()

    def _parse_chunks(self) -> None:
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.buffer[:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return
                del self.buffer[: trailer_end + 4]
                self._done()
                return
            if len(self.buffer) < line_end + 2 + size + 2:
                return
            start = line_end + 2
            self.body += self.buffer[start : start + size]
            del self.buffer[: start + size + 2]

    def _done(self) -> None:
        reply = HttpReply(self.status, self.headers, bytes(self.body))
        if self.buffer:
            self.reusable = False  # more than one answer: do not trust this connection
        self._reset()
        assert self.waiter is not None
        if not self.waiter.done():
            self.waiter.set_result(reply)

    # use

    @property
    def usable(self) -> bool:
        """Open, and not being closed (the server's FIN may be read before
        ``connection_lost`` runs)."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def send(self, data: bytes) -> asyncio.Future[HttpReply]:
        if self.transport is None or not self.usable:
            msg = "the connection closed before the request was sent"
            raise ProtocolError(msg)
        self.waiter = asyncio.get_running_loop().create_future()
        self.answered = False
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class AsyncOrigin:
    """Keep-alive connections to one origin, for the event loop that uses it (one instance
    per loop: a connection belongs to the loop that opened it)."""

    def __init__(self, origin: Origin, ssl_context: ssl.SSLContext | None = None) -> None:
        self.origin = origin
        self._ssl = ssl_context
        if origin.scheme == "https" and ssl_context is None:
            self._ssl = ssl.create_default_context()
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            _Connection,
            self.origin.host,
            self.origin.port,
            ssl=self._ssl,
            server_hostname=self.origin.host if self._ssl is not None else None,
        )
        return connection

    async def post(
        self, target: str, headers: dict[str, str], body: bytes, *, timeout_s: float | None
    ) -> HttpReply:
        """POST ``body`` to ``target`` (a path with its query). Raises ``TimeoutError`` after
        ``timeout_s`` seconds, :class:`ProtocolError` (a ``ConnectionError``) or ``OSError``
        when no whole answer came."""
        data = request_head(self.origin, target, headers, len(body)) + body
        async with asyncio.timeout(timeout_s):
            connection = None
            while self._idle and connection is None:
                idle = self._idle.pop()
                connection = idle if idle.usable else None  # closed while idle: dropped
            if connection is None:
                connection = await self._connect()
            return await self._exchange(connection, data)

    async def _exchange(self, connection: _Connection, data: bytes) -> HttpReply:
        try:
            reply = await connection.send(data)
        except BaseException:
            connection.close()  # cancelled, timed out or broken: the server sees us go
            raise
        if connection.reusable and connection.usable:
            self._idle.append(connection)
        else:
            connection.close()
        return reply

    def close(self) -> None:
        """Close the idle connections (requests in flight close theirs when they end)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


# -- sync -------------------------------------------------------------------------------------


class SyncOrigin:
    """Keep-alive ``http.client`` connections to one origin, shared by every thread (each
    request takes an idle connection or opens one, and puts it back when done)."""

    def __init__(self, origin: Origin, ssl_context: ssl.SSLContext | None = None) -> None:
        self.origin = origin
        self._ssl = ssl_context
        if origin.scheme == "https" and ssl_context is None:
            self._ssl = ssl.create_default_context()
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.origin.scheme == "https":
            return http.client.HTTPSConnection(
                self.origin.host, self.origin.port, timeout=timeout, context=self._ssl
            )
        return http.client.HTTPConnection(self.origin.host, self.origin.port, timeout=timeout)

    def post(
        self, target: str, headers: dict[str, str], body: bytes, *, timeout_s: float | None
    ) -> HttpReply:
        """Blocking :meth:`AsyncOrigin.post` (the timeout bounds each socket wait)."""
        connection = None
        while connection is None:
            with self._lock:
                if not self._idle:
                    break
                connection = self._idle.pop()
            if _stale(connection):
                connection.close()
                connection = None
        if connection is None:
            connection = self._connect(timeout_s)
        return self._exchange(connection, target, headers, body, timeout_s)

    def _exchange(
        self,
        connection: http.client.HTTPConnection,
        target: str,
        headers: dict[str, str],
        body: bytes,
        timeout: float | None,
    ) -> HttpReply:
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        answered = False
        try:
            connection.request("POST", target, body, headers)
            response = connection.getresponse()
            answered = True
            data = response.read()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            connection.close()
            msg = f"the server closed the connection ({exc})"
            raise ProtocolError(msg, answered=answered) from exc
        except http.client.HTTPException as exc:
            connection.close()
            msg = f"malformed answer: {exc!r}"
            raise ProtocolError(msg, answered=True) from exc
        except BaseException:
            connection.close()
            raise
        reply = HttpReply(
            response.status, {name.lower(): value for name, value in response.getheaders()}, data
        )
        if response.will_close:
            connection.close()
        else:
            with self._lock:
                self._idle.append(connection)
        return reply

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


def _stale(connection: http.client.HTTPConnection) -> bool:
    """Whether an idle connection can no longer carry a request: closed, or readable (the
    server closed its end or sent something unasked)."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
