"""The scheduler: a full refresh per manager every ``refresh_interval``, and at start when due.

Flow: **scheduler** -> batcher.request_full(manager) -> refresher.

At start a manager that was never fully refreshed (or whose last full refresh
is older than its interval) gets a full refresh at once; afterwards one every
``refresh_interval`` counted from the last full refresh request.  Full
refreshes asked for by events or operators do not reset the timer (the
periodic one is the safety net for lost events).  Time is the injected clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

from daemon.batcher import Batcher
from daemon.clock import Clock
from daemon.targets import Trigger

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        batcher: Batcher,
        *,
        intervals: Mapping[str, float],
        clock: Clock,
    ) -> None:
        self._batcher = batcher
        self._intervals = dict(intervals)
        self._clock = clock
        self._next: dict[str, float] = {}
        self._startup: set[str] = set()
        """Managers whose first request is the start-up refresh (never refreshed, or overdue)."""

    def plan(self, last_full: Mapping[str, datetime | None], *, now_wall: datetime) -> None:
        """Compute each manager's first due time from its last full refresh."""
        now = self._clock.now()
        for manager, interval in self._intervals.items():
            last = last_full.get(manager)
            if last is None:
                self._next[manager] = now
                self._startup.add(manager)
                continue
            if last.tzinfo is None:
                last = last.replace(tzinfo=UTC)
            age = (now_wall - last).total_seconds()
            self._next[manager] = now + max(0.0, interval - age)
            if age >= interval:
                self._startup.add(manager)

    def due_in(self, manager: str) -> float:
        return self._next[manager] - self._clock.now()

    async def run(self) -> None:
        """Request full refreshes as they fall due, forever (cancel to stop)."""
        if not self._next:
            self.plan({}, now_wall=datetime.now(UTC))
        while True:
            now = self._clock.now()
            for manager, due in sorted(self._next.items(), key=lambda kv: kv[1]):
                if due <= now:
                    trigger = Trigger.STARTUP if manager in self._startup else Trigger.SCHEDULED
                    log.info("manager %s: %s full refresh", manager, trigger.value)
                    try:
                        self._batcher.request_full(manager, trigger=trigger)
                    except Exception as exc:  # noqa: BLE001 - stopping or full: try next round
                        log.warning("manager %s: could not queue full refresh: %s", manager, exc)
                        self._next[manager] = now + min(60.0, self._intervals[manager])
                        continue
                    self._next[manager] = now + self._intervals[manager]
                    self._startup.discard(manager)
            await self._clock.sleep_until(min(self._next.values()))


async def run_forever(scheduler: Scheduler) -> None:
    try:
        await scheduler.run()
    except asyncio.CancelledError:
        log.debug("scheduler stopped")
        raise
