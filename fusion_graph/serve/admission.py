"""Admission control: a bounded number of requests in flight and a bounded queue.

A request takes a turn (:meth:`Admission.enter`) before it calls the upstream and gives it
back (:meth:`Turn.leave`) when its response is finished, streamed ones included. When every
turn is taken it waits, unless the queue is full too: then :class:`Overloaded` is raised
at once (the app answers 429 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio


class Overloaded(Exception):
    """Every turn is taken and the queue is full."""


class Turn:
    """One admitted request's turn; :meth:`leave` gives it back (once)."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def leave(self) -> None:
        if self._admission is not None:
            self._admission.leave()
            self._admission = None


class Admission:
    """At most ``max_in_flight`` requests at once and ``max_queue`` waiting (one event loop)."""

    def __init__(self, *, max_in_flight: int, max_queue: int) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.in_flight = 0
        """Requests holding a turn."""
        self.waiting = 0
        """Requests waiting for one."""
        self._freed = asyncio.Condition()

    async def enter(self) -> Turn:
        """A turn, after waiting in the queue if need be.

        Raises:
            Overloaded: every turn is taken and ``max_queue`` requests already wait.
        """
        if self.in_flight >= self.max_in_flight:
            if self.waiting >= self.max_queue:
                msg = (
                    f"the server is at its limit ({self.max_in_flight} requests in flight, "
                    f"{self.waiting} waiting)"
                )
                raise Overloaded(msg)
            self.waiting += 1
            try:
                async with self._freed:
                    await self._freed.wait_for(lambda: self.in_flight < self.max_in_flight)
            finally:
                self.waiting -= 1
        self.in_flight += 1
        return Turn(self)

    def leave(self) -> None:
        self.in_flight -= 1
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()
