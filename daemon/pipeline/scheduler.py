"""The scheduler: a full refresh per manager every ``refresh_interval``, and at start when due,
once per interval across every process that shares the database.

Flow: **scheduler** -> (ownership of the manager) -> batcher.request_full(manager) -> refresher.

At start a manager that was never fully refreshed (or whose last full refresh
is older than its interval) falls due at once; afterwards every
``refresh_interval`` counted from the last full refresh.  When a manager falls
due the scheduler takes its ownership (daemon/pipeline/ownership.py) and reads
``managers.last_full_refresh_at`` *under* it: if another process did the full
refresh meanwhile, nothing is queued and the next due time follows that
refresh.  A manager that another process owns right now is that process's to
refresh; it is looked at again after ``recheck`` seconds.  So however many
daemons run, a scheduled (or start-up) full refresh happens once per interval
per manager.  Full refreshes asked for by events or operators do not reset
the timer unless they commit (the periodic one is the safety net for lost
events).  Time is the injected clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol

from daemon.model.targets import Trigger
from daemon.pipeline.clock import Clock
from daemon.pipeline.ownership import Ownership

log = logging.getLogger(__name__)

LastFullReader = Callable[[str], Awaitable[datetime | None]]
"""Reads ``managers.last_full_refresh_at`` of one manager from the database."""


class FullRequester(Protocol):
    def request_full(self, manager: str, *, trigger: Trigger) -> object: ...


class Scheduler:
    def __init__(
        self,
        batcher: FullRequester,
        *,
        intervals: Mapping[str, float],
        clock: Clock,
        ownership: Ownership,
        last_full: LastFullReader,
        recheck: float = 30.0,
    ) -> None:
        self._batcher = batcher
        self._intervals = dict(intervals)
        self._clock = clock
        self._ownership = ownership
        self._last_full = last_full
        self._recheck = recheck
        self._next: dict[str, float] = {}
        self._startup: set[str] = set()
        """Managers due at start (never fully refreshed, or overdue): ``Trigger.STARTUP``."""

    def plan(self, last_full: Mapping[str, datetime | None], *, now_wall: datetime) -> None:
        """Compute each manager's first due time from its last full refresh."""
        now = self._clock.now()
        for manager, interval in self._intervals.items():
            remaining = _remaining(last_full.get(manager), interval, now_wall)
            self._next[manager] = now + remaining
            if remaining <= 0:
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
                    self._next[manager] = now + await self._decide(manager)
            await self._clock.sleep_until(min(self._next.values()))

    async def _decide(self, manager: str) -> float:
        """Queue the due full refresh of ``manager`` if still due; seconds until the next look."""
        interval = self._intervals[manager]
        try:
            async with self._ownership.hold(manager) as owned:
                # "not due any more" needs no ownership: only queuing does (two processes
                # refused together would otherwise meet again at every recheck)
                remaining = _remaining(await self._last_full(manager), interval, datetime.now(UTC))
                if remaining > min(1.0, interval * 0.1):
                    log.info(
                        "manager %s: full refresh already done by another process; next in %.0fs",
                        manager,
                        remaining,
                    )
                    return remaining
                if not owned:
                    log.debug(
                        "manager %s: full refresh due; another process owns it "
                        "(looking again in %.0fs)",
                        manager,
                        min(self._recheck, interval),
                    )
                    return min(self._recheck, interval)
                trigger = Trigger.STARTUP if manager in self._startup else Trigger.SCHEDULED
                log.info("manager %s: scheduled full refresh (%s)", manager, trigger.value)
                self._batcher.request_full(manager, trigger=trigger)
                self._startup.discard(manager)
                return interval
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - stopping, database down: try next round
            retry = min(self._recheck, interval)
            log.warning(
                "manager %s: could not decide its full refresh (%s: %s); trying again in %.0fs",
                manager,
                type(exc).__name__,
                exc,
                retry,
            )
            return retry


def _remaining(last: datetime | None, interval: float, now_wall: datetime) -> float:
    """Seconds until a full refresh done at ``last`` is ``interval`` old (0: due now)."""
    if last is None:
        return 0.0
    if last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    return max(0.0, interval - (now_wall - last).total_seconds())
