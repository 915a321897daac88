"""Fixtures of the fault-injection tier: one fake OpenAI-compatible server on loopback for the
session (:mod:`tests.faults.fake_openai`), configured afresh for every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fusion_graph.integrations import endpoint_limits
from fusion_graph.integrations.openai_compat import forget_endpoint
from tests.faults.fake_openai import FakeOpenAI


@pytest.fixture(scope="session")
def fake_openai_server() -> Iterator[FakeOpenAI]:
    """The server, started once (the OpenAI clients of a base URL are built once, which is
    most of a request's cost here) and stopped at the end of the session."""
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def fake_openai(fake_openai_server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """The server with no faults, honouring ``n``, nothing recorded, and nothing remembered
    about the endpoint (its limit, whether it ignores ``n``). After the test, no request may
    be left in flight."""
    yield from afresh(fake_openai_server)


def afresh(server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """A fixture's body: ``server`` configured afresh for one test, checked idle after it."""
    _forget(server.base_url)
    server.configure()
    yield server
    try:
        assert server.wait_idle(), f"{server.in_flight} request(s) left in flight at the server"
    finally:
        _forget(server.base_url)


def _forget(base_url: str) -> None:
    forget_endpoint(base_url)
    # A limiter that still has a slot out is kept by forget_endpoint; never carry it over.
    endpoint_limits._LIMITERS.pop(endpoint_limits.endpoint_key(base_url), None)
