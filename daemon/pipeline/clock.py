"""Clocks: where the pipeline reads the time and waits for deadlines.

Flow: event -> Target -> **batch** (debounce, max delay, retry backoff) -> ...

Every deadline in the pipeline is a point on one monotonic timeline, read
from the :class:`Clock` the component was given.  Production uses
:class:`LoopClock` (the event loop's ``loop.time()``); tests use
``tests/fake_clock.py``'s ``FakeClock``, whose time moves only when the test
calls ``advance``, so a test asserts exact times and never waits on real time.

Guarantees: ``now()`` never goes backwards; ``wait_event(event, deadline)``
returns as soon as ``event`` is set or the clock reaches ``deadline``,
whichever comes first; cancellation always propagates.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


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
