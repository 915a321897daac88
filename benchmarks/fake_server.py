"""A fast fake OpenAI-compatible chat-completions server for the backend benchmark.

It answers every ``POST .../chat/completions`` after a fixed latency (``asyncio`` timers, so
64 requests in flight cost it next to nothing), honours ``n`` or ignores it (one choice,
like llama.cpp's server), and counts the requests it received (``GET /stats``). It runs in
a process of its own, so the client's CPU time (``time.process_time``) is the client's
alone and the server does not compete for the client's interpreter lock.

A request with a ``seed`` is a candidate and gets ``Candidate <seed>.\\nThe answer is 42.``;
one without is a decision call (fusor, judge, pairwise judge) and gets a JSON verdict that
both judges parse: ``{"score": 7, "winner": "A", "rationale": "ok"}``.

    python -m benchmarks.fake_server --latency 0.1 [--ignore-n]   # prints the port
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

VERDICT = '{"score": 7, "winner": "A", "rationale": "ok"}'


class _Counter:
    requests = 0


def _completion(body: dict[str, Any], honour_n: bool) -> bytes:
    seed = body.get("seed")
    k = int(body.get("n") or 1) if honour_n else 1
    choices = []
    for i in range(k):
        text = VERDICT if seed is None else f"Candidate {seed}/{i}.\nThe answer is 42."
        choice: dict[str, Any] = {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
            "logprobs": None,
        }
        choices.append(choice)
    payload = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "fake"),
        "choices": choices,
        "usage": {"prompt_tokens": 12, "completion_tokens": 6 * k, "total_tokens": 12 + 6 * k},
    }
    return json.dumps(payload).encode()


class _Protocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; only what an HTTP client sends to a chat endpoint."""

    def __init__(self, latency: float, honour_n: bool) -> None:
        self.latency = latency
        self.honour_n = honour_n
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
            self._answer(head.split(" ", 2), body)

    def _answer(self, request_line: list[str], body: bytes) -> None:
        method, path = request_line[0], request_line[1]
        loop = asyncio.get_running_loop()
        if method == "GET" and path.endswith("/stats"):
            self._send(json.dumps({"requests": _Counter.requests}).encode())
            return
        if method == "POST" and path.endswith("/reset"):
            _Counter.requests = 0
            self._send(b"{}")
            return
        _Counter.requests += 1
        data = _completion(json.loads(body), self.honour_n)
        loop.call_later(self.latency, self._send, data)

    def _send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        self.transport.write(head + data)


async def _serve(latency: float, honour_n: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Protocol(latency, honour_n), "127.0.0.1", 0, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fake_server")
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--ignore-n", action="store_true")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.latency, not args.ignore_n))
    return 0


@contextmanager
def fake_server(latency: float, *, honour_n: bool) -> Iterator[str]:
    """Start the server in a process of its own; yields its base URL (``.../v1``)."""
    command = [sys.executable, "-m", "benchmarks.fake_server", "--latency", str(latency)]
    if not honour_n:
        command.append("--ignore-n")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    raise SystemExit(main())
