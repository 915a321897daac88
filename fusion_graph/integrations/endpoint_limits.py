"""Per-endpoint bounds on requests in flight, shared by threads and event loops.

Every request to one endpoint (a base URL) from this process holds a slot of that endpoint's
:class:`EndpointLimiter` while it runs, whatever made it: a worker thread of the sync API, or a
coroutine of the async API on any event loop (each ``asyncio.run`` has its own). So a fan-out
of 64 candidates against a small server keeps at most ``limit`` requests in flight, and two
model objects pointed at one server share one bound. :func:`endpoint_limiter` returns an
endpoint's limiter (created on first use).

The limit
    Until someone names one, an endpoint's limit is :func:`default_limit`:
    :data:`DEFAULT_LOOPBACK_CONCURRENCY` (64) for a server on this machine (``localhost``,
    ``127.0.0.0/8``, ``::1``), :data:`DEFAULT_MAX_CONCURRENCY` (16) for any other. A local
    server (vLLM, llama.cpp's server, Ollama) batches or queues what it receives and is
    slowed down by a client-side cap below the fan-out: against a server that ignores
    ``n``, a cap of 8 made a fan-out of N=64 4.4x slower than no cap. A hosted API is shared
    and rate-limited, so a remote endpoint gets a moderate default. A limit named
    explicitly (``max_concurrency=`` of a model, the ``concurrency=`` option of a model
    spec, ``endpoint_limiter(url, limit=...)``) replaces the default, up or down; when
    several callers name limits for one endpoint, the smallest wins. A model that names no
    limit never changes it.

Why not ``threading.BoundedSemaphore`` (with ``asyncio.to_thread`` for coroutines)? A waiting
coroutine would then hold a thread blocked in ``acquire`` for as long as it waits: a fan-out of
64 at limit 4 parks 60 threads, and on the default executor (a handful of threads on a small
machine) those parked acquires starve everything else that runs there, including the
``getaddrinfo`` of the requests holding the slots. A cancelled coroutine cannot take back its
thread's pending ``acquire`` either, which then takes a slot nobody releases unless extra
bookkeeping gives it back. Here a waiting coroutine holds no thread: it awaits a future of its
own loop, which the releasing thread resolves with ``call_soon_threadsafe``; a waiting thread
blocks on an ``Event``. Slots go first come, first served to both kinds. The limit can change
while requests are in flight or waiting: lowered, released slots are not handed on until fewer
than the new limit are in flight; raised, waiters get the new slots at once. A waiter
interrupted while it waits (a cancelled coroutine, a thread hit by ``KeyboardInterrupt``)
takes no slot: it leaves the queue, or passes on the slot it was handed meanwhile.

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
import functools
import ipaddress
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_LOOPBACK_CONCURRENCY",
    "DEFAULT_MAX_CONCURRENCY",
    "EndpointLimiter",
    "default_limit",
    "endpoint_key",
    "endpoint_limiter",
    "forget_limiter",
    "is_loopback",
]

DEFAULT_MAX_CONCURRENCY = 16
"""Requests in flight to a remote endpoint (a hosted API) when nothing else is said."""
DEFAULT_LOOPBACK_CONCURRENCY = 64
"""Requests in flight to a server on this machine when nothing else is said."""
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
    in flight at once) let tests and benchmarks check the bound. Change ``limit`` with
    :meth:`set_limit` (which also hands new slots to waiters).

    Example:
        >>> limiter = EndpointLimiter(limit=2)
        >>> with limiter.slot():
        ...     limiter.in_flight
        1
    """

    limit: int
    in_flight: int = 0
    peak: int = 0
    explicit: bool = True
    """Whether someone named ``limit`` (False: it is the endpoint's default, which the first
    limit named replaces, up or down)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _waiters: deque[_Waiter] = field(default_factory=deque, repr=False)

    def _take_locked(self) -> bool:
        if not self._waiters and self.in_flight < self.limit:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            return True
        return False

    def _grant_locked(self) -> list[_Waiter]:
        """Hand free slots to the longest waiters (to be woken once the lock is let go)."""
        granted: list[_Waiter] = []
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            waiter.granted = True
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            granted.append(waiter)
        return granted

    def _wake(self, granted: list[_Waiter]) -> None:
        """Wake the waiters handed a slot; a slot whose waiter's event loop is gone goes on."""
        while granted:
            gone = [waiter for waiter in granted if not waiter.wake()]
            if not gone:
                return
            with self._lock:
                self.in_flight -= len(gone)
                granted = self._grant_locked()

    def set_limit(self, limit: int, *, explicit: bool = True) -> None:
        """Change the limit. Lowered: requests in flight go on, and released slots are not
        handed on until fewer than ``limit`` are in flight. Raised: waiters get the new
        slots now."""
        if limit < 1:
            msg = f"an endpoint's limit must be at least 1, got {limit}"
            raise ValueError(msg)
        with self._lock:
            self.limit = limit
            self.explicit = self.explicit or explicit
            granted = self._grant_locked()
        self._wake(granted)

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter gives up (cancelled, interrupted): it leaves the queue, or passes on the
        slot it was handed meanwhile."""
        with self._lock:
            granted = waiter.granted
            if not granted:
                self._waiters.remove(waiter)
        if granted:
            self.release()

    def acquire(self) -> None:
        """Take a slot, blocking this thread until one is free.

        Interrupted while waiting (``KeyboardInterrupt``, or any exception a signal handler
        raises), it takes no slot: it leaves the queue or, when a slot was handed to it
        meanwhile, passes that slot on.
        """
        waiter = _Waiter(event=threading.Event())
        with self._lock:
            if self._take_locked():
                return
            self._waiters.append(waiter)
        try:
            assert waiter.event is not None
            waiter.event.wait()
        except BaseException:
            self._abandon(waiter)
            raise

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
        try:
            assert waiter.future is not None
            await waiter.future
        except BaseException:
            self._abandon(waiter)
            raise

    def release(self) -> None:
        """Give a slot back (to the longest waiter, if the limit allows one more)."""
        with self._lock:
            self.in_flight -= 1
            granted = self._grant_locked()
        self._wake(granted)

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


@functools.lru_cache(maxsize=256)
def is_loopback(base_url: str | None) -> bool:
    """Whether ``base_url`` names a server on this machine: ``localhost`` or a loopback
    address (``127.0.0.0/8``, ``::1``); a host name is never resolved."""
    host = urlsplit(base_url or DEFAULT_BASE_URL).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost
        return False


def default_limit(base_url: str | None) -> int:
    """An endpoint's limit until someone names one: :data:`DEFAULT_LOOPBACK_CONCURRENCY` on
    loopback, :data:`DEFAULT_MAX_CONCURRENCY` elsewhere (see the module docs)."""
    return DEFAULT_LOOPBACK_CONCURRENCY if is_loopback(base_url) else DEFAULT_MAX_CONCURRENCY


def endpoint_limiter(base_url: str | None, limit: int | None = None) -> EndpointLimiter:
    """The process-wide limiter of one endpoint (created on first use).

    ``limit`` (a limit named explicitly) replaces the endpoint's default, up or down, and
    lowers a limit named before when it is smaller (the smallest named limit wins). None
    changes nothing: a new endpoint starts at :func:`default_limit`.
    """
    if limit is not None and limit < 1:
        msg = f"an endpoint's limit must be at least 1, got {limit}"
        raise ValueError(msg)
    key = endpoint_key(base_url)
    with _LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            if limit is None:
                limiter = EndpointLimiter(limit=default_limit(key), explicit=False)
            else:
                limiter = EndpointLimiter(limit=limit)
            _LIMITERS[key] = limiter
        elif limit is not None and (not limiter.explicit or limit < limiter.limit):
            limiter.set_limit(limit)
        return limiter


def forget_limiter(base_url: str | None) -> None:
    """Drop an endpoint's limiter once it is idle (the next use creates a fresh one, with the
    limit it names). Useful when a server is restarted with other settings, and in tests."""
    key = endpoint_key(base_url)
    with _LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is not None and limiter.in_flight == 0:
            del _LIMITERS[key]
