"""The client's side of a request: noticing that it went away, and a streamed response that
gives the request's admission turn (and its upstream connection) back however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed its connection before the answer was ready."""


class ResponseWithTurn(StreamingResponse):
    """A streamed response that gives its admission turn back when it is over, however it
    ends (finished, client gone, never started), after awaiting ``release`` (what the
    stream holds upstream: its connection, its endpoint slot)."""

    def __init__(
        self,
        content: Any,
        *,
        on_close: Callable[[], None],
        release: Callable[[], Awaitable[None]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                if self._release is not None:
                    with anyio.CancelScope(shield=True):  # also when the stream was cancelled
                        await self._release()
            finally:
                self._on_close()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; cancelled (and :class:`ClientDisconnected` raised) if the client
    closes its connection first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its upstream calls are stopped before we go on
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
