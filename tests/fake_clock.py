"""FakeClock: a :class:`daemon.pipeline.clock.Clock` for tests, whose time moves only when told.

Flow: test -> **FakeClock.advance** -> sleepers (batcher, scheduler, ...) woken in deadline order.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any


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
