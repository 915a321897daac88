"""What this process keeps per event loop for OpenAI-compatible endpoints, and when it is
closed.

A connection belongs to the event loop that opened it: reused from another loop, or after
its loop closed, it breaks ("Event loop is closed"). So each event loop gets its own:

* **connections** of the lean request path, one
  :class:`~fusion_graph.integrations.http1.AsyncOrigin` per origin (:func:`async_origin`);
* **copies** of the models that still go through the SDK (streams and the other cases the
  lean path leaves to it), each with an HTTP client of its own (:func:`copy_for`,
  :func:`keep_copy`).

When a loop shuts down (``asyncio.run`` and ``asyncio.Runner`` call
``loop.shutdown_asyncgens`` before closing it), an async generator started on it closes that
loop's connections and copies. A copy whose model is gone is closed when the next copy is made
on its loop; the entries of loops closed without that shutdown are dropped (their sockets
close when collected) when the next copy or connection set is made on any loop. So repeated
``asyncio.run`` calls keep no loops, clients or connections alive.

Blocking requests share one :class:`~fusion_graph.integrations.http1.SyncOrigin` per origin,
for the whole process (:func:`sync_origin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fusion_graph.integrations.http1 import AsyncOrigin, Origin, SyncOrigin

__all__ = [
    "LOOPS",
    "Closer",
    "LoopEntry",
    "async_origin",
    "copy_for",
    "forget_sync_origin",
    "keep_copy",
    "sync_origin",
]

Closer = Callable[[Any], Awaitable[None]]
"""Closes one model copy's client (best effort)."""


@dataclass(eq=False)
class LoopEntry:
    """One event loop's connections and model copies, and the async generator that closes
    them when the loop shuts down."""

    copies: dict[int, tuple[weakref.ref[Any], Any, Closer]] = field(default_factory=dict)
    """``id(model)`` -> (the model, weakly; its copy; how to close the copy)."""
    origins: dict[Origin, AsyncOrigin] = field(default_factory=dict)
    """The lean path's connections, per origin."""
    watcher: AsyncGenerator[None, None] | None = None
    dropped: bool = False
    """Set when the loop closed without shutting its async generators down."""


# _LOCK guards LOOPS and _SYNC_ORIGINS. An entry holds its loop alive (through its clients'
# connections and its watcher), so entries are removed explicitly: when the loop shuts down,
# or, for a loop closed without that, at the next copy or connection set made on any loop.
_LOCK = threading.Lock()
LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopEntry] = weakref.WeakKeyDictionary()
"""The entries of the event loops that have any (read it, do not change it)."""
_SYNC_ORIGINS: dict[Origin, SyncOrigin] = {}


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
        origins, entry.origins = list(entry.origins.values()), {}
    for origin in origins:
        origin.close()
    for copy, close in copies:
        await close(copy)


def _drop(entry: LoopEntry) -> None:
    """Forget what a loop that is already closed kept (its sockets close when they are
    collected) and finish its watcher without running anything on the loop."""
    entry.dropped = True
    entry.copies.clear()
    entry.origins = {}
    watcher, entry.watcher = entry.watcher, None
    if watcher is None:
        return
    closing = watcher.aclose()  # _watch awaits nothing once dropped: one step finishes it
    with contextlib.suppress(StopIteration):
        closing.send(None)


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


async def async_origin(origin: Origin) -> AsyncOrigin:
    """The running loop's connections to ``origin`` (made on first use)."""
    loop = asyncio.get_running_loop()
    with _LOCK:
        entry = LOOPS.get(loop)
        found = entry.origins.get(origin) if entry is not None else None
        if found is not None:
            return found
        entry, closed, new_watcher = _entry(loop)
        found = entry.origins[origin] = AsyncOrigin(origin)
    await _settle(entry, closed, new_watcher)
    return found


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


def sync_origin(origin: Origin) -> SyncOrigin:
    """The process's blocking connections to ``origin``, shared by every thread."""
    with _LOCK:
        found = _SYNC_ORIGINS.get(origin)
        if found is None:
            found = _SYNC_ORIGINS[origin] = SyncOrigin(origin)
        return found


def forget_sync_origin(origin: Origin) -> None:
    """Close the idle blocking connections to ``origin`` and forget them."""
    with _LOCK:
        found = _SYNC_ORIGINS.pop(origin, None)
    if found is not None:
        found.close()
