"""Clocks: where the pipeline reads the time and waits for deadlines.

Flow: event -> Target -> **batch** (debounce, max delay, retry backoff) -> ...

Every deadline in the pipeline is a point on one monotonic timeline, read
from the :class:`Clock` the component was given.  Production uses
:class:`LoopClock` (the event loop's ``loop.time()``); tests use
:class:`FakeClock`, whose time moves only when the test calls
:meth:`FakeClock.advance`, so a test asserts exact times and never waits on
real time.

Guarantees: ``now()`` never goes backwards; ``wait_event(event, deadline)``
returns as soon as ``event`` is set or the clock reaches ``deadline``,
whichever comes first; cancellation always propagates.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any, Protocol


class Clock(Protocol):
    """A monotonic time source with deadline waits."""

    def now(self) -> float:
        """The current time, in seconds on this clock's monotonic timeline."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline``."""
        ...

    async def wait_event(self, event: asyncio.Event, deadline: float | None) -> bool:
        """Wait until ``event`` is set or ``deadline`` is reached (None: no deadline).

        Returns whether the event is set.
        """
        ...


class LoopClock:
    """The running event loop's clock (``loop.time()``): the production clock."""

    __slots__ = ()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - self.now()))

    async def wait_event(self, event: asyncio.Event, deadline: float | None) -> bool:
        if event.is_set():
            return True
        if deadline is None:
            await event.wait()
            return True
        try:
            async with asyncio.timeout_at(deadline):
                await event.wait()
        except TimeoutError:
            return event.is_set()
        return True


LOOP_CLOCK = LoopClock()
"""The shared production clock (it holds no state)."""


async def settle(rounds: int = 50) -> None:
    """Let ready tasks and callbacks run for ``rounds`` loop iterations (no real time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:
    """A clock for tests: time moves only through :meth:`advance`.

    ``await clock.advance(1.5)`` moves time forward in steps: each sleeper
    whose deadline falls within the advance is woken at exactly its deadline,
    in deadline order, and the loop is let run (:func:`settle`) after each
    wake-up, so work scheduled by a woken task (a retry one second later) is
    itself woken within the same advance when its deadline is reached.
    """

    __slots__ = ("_now", "_rounds", "_seq", "_sleepers")

    def __init__(self, start: float = 0.0, *, settle_rounds: int = 50) -> None:
        self._now = start
        self._rounds = settle_rounds
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        await self._sleeper(deadline)

    async def wait_event(self, event: asyncio.Event, deadline: float | None) -> bool:
        if event.is_set():
            return True
        if deadline is None:
            await event.wait()
            return True
        if deadline <= self._now:
            return False
        sleeper = self._sleeper(deadline)
        waiter = asyncio.ensure_future(event.wait())
        either: set[asyncio.Future[Any]] = {waiter, sleeper}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()
        return event.is_set()

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking due sleepers in deadline order."""
        if seconds < 0:
            raise ValueError("a clock never goes backwards")
        target = self._now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            if future.done():
                continue
            self._now = max(self._now, deadline)
            future.set_result(None)
            await self.settle()
        self._now = target
        await self.settle()

    async def settle(self) -> None:
        """Let the loop run without moving time."""
        await settle(self._rounds)

    @property
    def next_deadline(self) -> float | None:
        """The earliest deadline someone is waiting for, if any."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    def _sleeper(self, deadline: float) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._seq), future))
        return future
