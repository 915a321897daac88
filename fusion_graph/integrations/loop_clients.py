"""What this process keeps per event loop for OpenAI-compatible endpoints, and when it is
closed.

A connection belongs to the event loop that opened it: reused from another loop, or after
its loop closed, it breaks ("Event loop is closed"). So each event loop gets its own:

* **HTTP session** of the lean request path: one ``aiohttp.ClientSession``, whose
  connection pool keeps connections alive per host (:func:`http_session`);
* **copies** of the models that still go through the SDK (streams and the other cases the
  lean path leaves to it), each with an HTTP client of its own (:func:`copy_for`,
  :func:`keep_copy`).

When a loop shuts down (``asyncio.run`` and ``asyncio.Runner`` call
``loop.shutdown_asyncgens`` before closing it), an async generator started on it closes that
loop's session and copies. A copy whose model is gone is closed when the next copy is made
on its loop; the entries of loops closed without that shutdown are dropped (their sockets
close when collected) when the next copy or session is made on any loop. So repeated
``asyncio.run`` calls keep no loops, clients or connections alive.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = [
    "LOOPS",
    "Closer",
    "LoopEntry",
    "copy_for",
    "http_session",
    "keep_copy",
]

Closer = Callable[[Any], Awaitable[None]]
"""Closes one model copy's client (best effort)."""


@dataclass(eq=False)
class LoopEntry:
    """One event loop's HTTP session and model copies, and the async generator that closes
    them when the loop shuts down."""

    copies: dict[int, tuple[weakref.ref[Any], Any, Closer]] = field(default_factory=dict)
    """``id(model)`` -> (the model, weakly; its copy; how to close the copy)."""
    session: aiohttp.ClientSession | None = None
    """The lean path's connections."""
    watcher: AsyncGenerator[None, None] | None = None
    dropped: bool = False
    """Set when the loop closed without shutting its async generators down."""


# _LOCK guards LOOPS. An entry holds its loop alive (through its clients' connections and its
# watcher), so entries are removed explicitly: when the loop shuts down, or, for a loop
# closed without that, at the next copy or session made on any loop.
_LOCK = threading.Lock()
LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopEntry] = weakref.WeakKeyDictionary()
"""The entries of the event loops that have any (read it, do not change it)."""


async def _watch(entry: LoopEntry) -> AsyncGenerator[None, None]:
    """Waits, as an async generator of its event loop, for the loop to shut its async
    generators down (``loop.shutdown_asyncgens``), then closes the loop's entry."""
    try:
        yield
    finally:
        if not entry.dropped:
            await _close_entry(asyncio.get_running_loop(), entry)


async def _close_entry(loop: asyncio.AbstractEventLoop, entry: LoopEntry) -> None:
    with _LOCK:
        if LOOPS.get(loop) is entry:
            del LOOPS[loop]
        copies = [(copy, close) for _, copy, close in entry.copies.values()]
        entry.copies.clear()
        session, entry.session = entry.session, None
    if session is not None:
        await session.close()
    for copy, close in copies:
        await close(copy)


def _drop(entry: LoopEntry) -> None:
    """Forget what a loop that is already closed kept (its sockets close when they are
    collected) and finish its watcher without running anything on the loop."""
    entry.dropped = True
    entry.copies.clear()
    session, entry.session = entry.session, None
    if session is not None:
        # On a closed loop, aiohttp closes nothing and awaits nothing: one step marks the
        # session closed (so it does not warn of itself when collected).
        _finish_at_once(session.close())
    watcher, entry.watcher = entry.watcher, None
    if watcher is not None:
        _finish_at_once(watcher.aclose())  # _watch awaits nothing once dropped


def _finish_at_once(closing: Coroutine[Any, Any, Any]) -> None:
    """Run ``closing`` without a loop, as far as its first real wait (normally to its end)."""
    try:
        closing.send(None)
    except StopIteration:
        return
    closing.close()


def _entry(loop: asyncio.AbstractEventLoop) -> tuple[LoopEntry, list[LoopEntry], bool]:
    """``loop``'s entry (made when new), the entries of loops closed without shutting down
    (taken out, to drop), and whether the entry's watcher is new (to start). Hold the lock."""
    closed = [LOOPS.pop(other) for other in list(LOOPS) if other.is_closed()]
    entry = LOOPS.get(loop)
    if entry is None:
        entry = LOOPS[loop] = LoopEntry()
    new_watcher = entry.watcher is None
    if new_watcher:
        entry.watcher = _watch(entry)
    return entry, closed, new_watcher


async def _settle(entry: LoopEntry, closed: list[LoopEntry], new_watcher: bool) -> None:
    for old in closed:
        _drop(old)
    if new_watcher and entry.watcher is not None:
        # Started here, it is one of this loop's async generators: the loop closes it when
        # it shuts down (asyncio.run does), and it then closes the loop's entry.
        await entry.watcher.__anext__()


async def http_session() -> aiohttp.ClientSession:
    """The running loop's HTTP session (made on first use)."""
    loop = asyncio.get_running_loop()
    with _LOCK:
        entry = LOOPS.get(loop)
        if entry is not None and entry.session is not None:
            return entry.session
        entry, closed, new_watcher = _entry(loop)
        if entry.session is None:
            entry.session = aiohttp.ClientSession(
                # Requests in flight are bounded per endpoint by EndpointLimiter: the pool
                # adds no bound of its own.
                connector=aiohttp.TCPConnector(limit=0),
                cookie_jar=aiohttp.DummyCookieJar(),  # an API client keeps no cookies
            )
        session = entry.session
    await _settle(entry, closed, new_watcher)
    return session


def copy_for(model: object) -> Any | None:
    """The running loop's copy of ``model``, if one was kept."""
    with _LOCK:
        entry = LOOPS.get(asyncio.get_running_loop())
        found = entry.copies.get(id(model)) if entry is not None else None
    return found[1] if found is not None and found[0]() is model else None


async def keep_copy(model: object, copy: object, close: Closer) -> None:
    """Keep ``copy`` as ``model``'s copy for the running loop, closed with ``close`` when the
    loop shuts down; close now the copies of this loop whose models are gone."""
    loop = asyncio.get_running_loop()
    with _LOCK:
        entry, closed, new_watcher = _entry(loop)
        gone = [key for key, (ref, _, _) in entry.copies.items() if ref() is None]
        stale = [entry.copies.pop(key) for key in gone]
        entry.copies[id(model)] = (weakref.ref(model), copy, close)
    await _settle(entry, closed, new_watcher)
    for _, old, close_old in stale:
        await close_old(old)
