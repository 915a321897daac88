"""Fixtures of the proxy tests: the proxy (``fusion_graph.serve``) on a free loopback port,
run by uvicorn in a thread, in front of the fake OpenAI-compatible server of
``tests/faults`` (which counts every request it gets), or in front of a fake chat model.

``serve(upstream, limits=..., api_key=...)`` starts one proxy and stops it after the test
(uvicorn's own shutdown: in-flight requests are drained first). ``prompt_fake`` is a second
fake upstream of its own.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import uvicorn
from starlette.types import ASGIApp

from fusion_graph.integrations import endpoint_limits
from fusion_graph.integrations.openai_compat import forget_endpoint
from fusion_graph.serve import ServeLimits, create_app
from tests.faults.conftest import afresh, fake_openai, fake_openai_server
from tests.faults.fake_openai import FakeOpenAI

__all__ = ["fake_openai", "fake_openai_server"]  # the fault tier's fixtures, reused here

HOST = "127.0.0.1"
FAKE_MODEL = "fake"
"""The model name the fake upstream is served under."""


@dataclass
class RunningProxy:
    """A proxy listening on loopback."""

    app: ASGIApp
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def async_client(self, api_key: str = "unused", **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the proxy did not shut down"


def start_proxy(app: ASGIApp) -> RunningProxy:
    """Run ``app`` (the proxy, or any ASGI app) with uvicorn on a free loopback port, in a
    thread; return once it listens."""
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets
    # whose proto says TCP, as those of `fusion-graph serve` (uvicorn.run(host=, port=)) do;
    # with 0, a response's body waits ~40 ms for the client's delayed ACK of its head.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=20)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="proxy", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the proxy did not start"
        time.sleep(0.01)
    return RunningProxy(app, server, thread, sock.getsockname()[1])


Serve = Callable[..., RunningProxy]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start proxies: ``serve(upstream, limits=ServeLimits(...), api_key=...)``."""
    running: list[RunningProxy] = []

    def start(upstream: Any, **options: Any) -> RunningProxy:
        proxy = start_proxy(create_app(upstream, **options))
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        proxy.stop()


def fake_spec(fake: FakeOpenAI) -> str:
    """The model spec of the fake upstream."""
    return f"openai:{fake.base_url}:{FAKE_MODEL}"


@pytest.fixture
def proxy(fake_openai: FakeOpenAI, serve: Serve) -> RunningProxy:
    """A proxy with default limits in front of the fake upstream (honouring ``n``)."""
    return serve(fake_spec(fake_openai), limits=ServeLimits(max_n=8))


def forget_upstream(base_url: str) -> None:
    """Nothing remembered about an endpoint (its limiter, whether it ignores ``n``)."""
    forget_endpoint(base_url)
    endpoint_limits._LIMITERS.pop(endpoint_limits.endpoint_key(base_url), None)


@pytest.fixture(scope="session")
def prompt_fake_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def prompt_fake(prompt_fake_server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """A second fake upstream, configured afresh for the test (as ``fake_openai``)."""
    yield from afresh(prompt_fake_server)
