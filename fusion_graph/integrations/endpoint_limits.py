"""Per-endpoint bounds on requests in flight, shared by threads and event loops.

Every request to one endpoint (a base URL) from this process holds a slot of that endpoint's
:class:`EndpointLimiter` while it runs, whatever made it: a worker thread of the sync API, or a
coroutine of the async API on any event loop (each ``asyncio.run`` has its own). So a fan-out
of 64 candidates against a small server keeps at most ``limit`` requests in flight, and two
model objects pointed at one server share one bound. :func:`endpoint_limiter` returns an
endpoint's limiter (created on first use); when callers name different limits for one endpoint,
the smallest wins.

Why not ``threading.BoundedSemaphore`` (with ``asyncio.to_thread`` for coroutines)? A waiting
coroutine would then hold a thread blocked in ``acquire`` for as long as it waits: a fan-out of
64 at limit 4 parks 60 threads, and on the default executor (a handful of threads on a small
machine) those parked acquires starve everything else that runs there, including the
``getaddrinfo`` of the requests holding the slots. A cancelled coroutine cannot take back its
thread's pending ``acquire`` either, which then takes a slot nobody releases unless extra
bookkeeping gives it back. Here a waiting coroutine holds no thread: it awaits a future of its
own loop, which the releasing thread resolves with ``call_soon_threadsafe``; a waiting thread
blocks on an ``Event``. Slots go first come, first served to both kinds, and the limit can be
lowered while requests are in flight.

Example:
    >>> limiter = endpoint_limiter("http://127.0.0.1:8000/v1/", limit=2)
    >>> limiter is endpoint_limiter("http://127.0.0.1:8000/v1")
    True
    >>> with limiter.slot():
    ...     limiter.in_flight
    1
    >>> forget_limiter("http://127.0.0.1:8000/v1")
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_CONCURRENCY",
    "EndpointLimiter",
    "endpoint_key",
    "endpoint_limiter",
    "forget_limiter",
]

DEFAULT_MAX_CONCURRENCY = 8
"""Requests in flight per endpoint when nothing else is said."""
DEFAULT_BASE_URL = "https://api.openai.com/v1"
"""The endpoint a base URL of None means (the OpenAI client's default)."""


@dataclass(eq=False)
class _Waiter:
    """A thread (``event``) or a coroutine (``loop`` and ``future``) queued for a slot."""

    event: threading.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[None] | None = None
    granted: bool = False
    """Set (under the limiter's lock) when a released slot was handed to this waiter."""

    def wake(self) -> bool:
        """Hand the slot over; False when the waiter's event loop is gone."""
        if self.event is not None:
            self.event.set()
            return True
        assert self.loop is not None and self.future is not None
        future = self.future
        try:
            self.loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:  # the loop was closed: nobody will take the slot
            return False
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # a cancelled waiter gives the slot back itself
        future.set_result(None)


@dataclass(eq=False)
class EndpointLimiter:
    """At most ``limit`` requests in flight to one endpoint, shared by threads and event loops.

    Slots are handed out first come, first served. ``in_flight`` and ``peak`` (the most ever
    in flight at once) let tests and benchmarks check the bound.

    Example:
        >>> limiter = EndpointLimiter(limit=2)
        >>> with limiter.slot():
        ...     limiter.in_flight
        1
    """

    limit: int
    in_flight: int = 0
    peak: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _waiters: deque[_Waiter] = field(default_factory=deque, repr=False)

    def _take_locked(self) -> bool:
        if not self._waiters and self.in_flight < self.limit:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            return True
        return False

    def acquire(self) -> None:
        """Take a slot, blocking this thread until one is free."""
        with self._lock:
            if self._take_locked():
                return
            waiter = _Waiter(event=threading.Event())
            self._waiters.append(waiter)
        assert waiter.event is not None
        waiter.event.wait()

    async def aacquire(self) -> None:
        """Take a slot, suspending this coroutine (not the thread) until one is free.

        Cancelled while waiting, it takes no slot: it leaves the queue or, when a slot was
        handed to it meanwhile, passes that slot on.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._take_locked():
                return
            waiter = _Waiter(loop=loop, future=loop.create_future())
            self._waiters.append(waiter)
        assert waiter.future is not None
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._waiters.remove(waiter)
            if granted:
                self.release()
            raise

    def release(self) -> None:
        """Give a slot back (to the longest waiter, if any)."""
        while True:
            with self._lock:
                if not self._waiters:
                    self.in_flight -= 1
                    return
                waiter = self._waiters.popleft()
                waiter.granted = True  # the slot passes on: in_flight is unchanged
            if waiter.wake():
                return

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """``with limiter.slot(): ...`` holds a slot for the block."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    @contextlib.asynccontextmanager
    async def aslot(self) -> AsyncIterator[None]:
        """``async with limiter.aslot(): ...`` holds a slot for the block."""
        await self.aacquire()
        try:
            yield
        finally:
            self.release()


_LOCK = threading.Lock()
_LIMITERS: dict[str, EndpointLimiter] = {}


def endpoint_key(base_url: str | None) -> str:
    """The name of an endpoint: its base URL without a trailing slash (None: OpenAI's API)."""
    return (base_url or DEFAULT_BASE_URL).rstrip("/")


def endpoint_limiter(base_url: str | None, limit: int | None = None) -> EndpointLimiter:
    """The process-wide limiter of one endpoint (created on first use).

    ``limit`` lowers the endpoint's bound when it is below the current one.
    """
    key = endpoint_key(base_url)
    with _LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            limiter = _LIMITERS[key] = EndpointLimiter(limit=limit or DEFAULT_MAX_CONCURRENCY)
        elif limit is not None and limit < limiter.limit:
            limiter.limit = limit
        return limiter


def forget_limiter(base_url: str | None) -> None:
    """Drop an endpoint's limiter once it is idle (the next use creates a fresh one, with the
    limit it names). Useful when a server is restarted with other settings, and in tests."""
    key = endpoint_key(base_url)
    with _LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is not None and limiter.in_flight == 0:
            del _LIMITERS[key]
