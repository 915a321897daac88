"""Fixtures of the unit tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.jobs_fakes import FakeOpenAI


@pytest.fixture
def jobs_server() -> Iterator[FakeOpenAI]:
    """A loopback OpenAI-compatible server for the batch jobs' commands
    (:class:`~tests.unit.jobs_fakes.FakeOpenAI`)."""
    with FakeOpenAI() as fake:
        yield fake
