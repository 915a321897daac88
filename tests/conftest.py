"""Shared fixtures. Every scenario that has a sync and an async form runs in both, from one
body, through the ``mode`` fixture."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

# The tests of plumbing (agents, CLI, proxy, Ray, docs, examples) need a real model, not a good
# one: they run the fastest packaged model, in this process and in the commands they start.
# The tests of the default model's answers and verdicts (tests/integration/test_quality.py)
# name it explicitly.
os.environ.setdefault("FUSION_GRAPH_LOCAL_MODEL", "smollm2-135m")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests talk to loopback only: any other address fails loudly."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if (
            isinstance(host, str)
            and host not in ("127.0.0.1", "localhost", "::1")
            and not (host.startswith("127.") or self.family == socket.AF_UNIX)
        ):
            raise RuntimeError(f"test tried to reach {address!r}: only loopback is allowed")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


class Mode:
    """Runs a Runnable (or coroutine-returning call) the sync or the async way."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sync = name == "sync"

    def invoke(self, runnable: Any, value: Any, config: Any = None) -> Any:
        if self.sync:
            return runnable.invoke(value, config)
        return asyncio.run(runnable.ainvoke(value, config))

    def run(self, runnable: Any, value: Any, config: Any = None) -> Any:
        """``FusionRunnable.run`` / ``arun``: the full result."""
        if self.sync:
            return runnable.run(value, config)
        return asyncio.run(runnable.arun(value, config))

    def call(self, sync_fn: Callable[[], Any], async_fn: Callable[[], Any]) -> Any:
        return sync_fn() if self.sync else asyncio.run(async_fn())


def meeting_model(parties: int, recorder: Any, *, threads: bool, replies: Any = ("ok",)) -> Any:
    """A fake model for parallelism tests that need no timing.

    ``threads=True`` (calls arrive on threads): each call waits at a barrier until
    ``parties`` calls are in flight together, so a fan-out that runs calls one after
    another breaks the barrier (10 s) and its candidates fail. ``threads=False`` (calls
    are coroutines on one loop, which start without waiting for a thread): calls sleep
    0.2 s instead, long enough for every coroutine to start.
    """
    from fusion_graph.testing import FakeCall, FakeChatModel

    if not threads:
        return FakeChatModel(replies=replies, delay=0.2, recorder=recorder)
    barrier = threading.Barrier(parties, timeout=10)

    def reply(call: FakeCall) -> Any:
        barrier.wait()
        return replies[(call.index or 0) % len(replies)]

    return FakeChatModel(replies=reply, recorder=recorder)


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> Mode:
    return Mode(request.param)


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A loopback OTLP/HTTP receiver: its base URL and what it received."""
    received: list[tuple[str, bytes]] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _uninstrument_after_test() -> Iterator[None]:
    """A test that turned tracing on (e.g. through ``configure_otlp``) must not leave it on."""
    yield
    try:
        from fusion_graph.integrations.opentelemetry import FusionGraphInstrumentor
    except ImportError:
        return
    instrumentor = FusionGraphInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
