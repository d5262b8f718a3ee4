"""Truthful health: what ``/healthz``, ``/readyz``, ``/managers`` and the systemd watchdog say.

Flow: catchers, batcher, database --(observed)--> **health** -> daemon.service.http
(``/healthz``, ``/readyz``, ``/managers``) and daemon.service.lifecycle (watchdog pings).

Guarantees:

* liveness (:meth:`Liveness.problems`): the batcher runs, every catcher says it
  is healthy (a Kafka catcher whose fetch or commit loop died or stalled does
  not), and the pipeline is not stuck (targets pending behind a refresh in
  flight, and no refresh ended for ``3 * shutdown_timeout + 10 min``).
  ``/healthz`` answers 503 with these reasons, and the systemd watchdog is
  pinged only while there are none: the same check, so a wedged daemon is
  restarted.  A database outage is not a liveness problem (a restart would not
  bring it back): it is a readiness one.
* readiness (:class:`DatabaseWatch`): the database is probed every
  ``PROBE_INTERVAL`` with a ``PROBE_TIMEOUT``; while it does not answer,
  ``/readyz`` is 503 with ``database unavailable``.  When it answers again,
  the failed refreshes that could not be recorded meanwhile are written to
  ``refresh_runs`` (``Persister.record_unrecorded``).
* :class:`ManagerMemory` keeps what the daemon saw of each manager's refreshes,
  so that ``/managers`` answers from memory while the database is away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.catcher import Catcher
from daemon.pipeline.batcher import Batcher
from daemon.pipeline.clock import Clock

log = logging.getLogger(__name__)

PROBE_INTERVAL = 2.0
"""Seconds between database probes."""
PROBE_TIMEOUT = 2.0
"""Seconds one probe (connect + ``SELECT 1``) may take before the database counts as away."""
DATABASE_UNAVAILABLE = "database unavailable"
STALL_GRACE = 600.0
"""Seconds, on top of ``3 * shutdown_timeout``, before a pipeline with work and no finished
refresh counts as stuck."""


@dataclass(slots=True)
class ManagerSeen:
    """One manager's refreshes as this process saw them (wall-clock UTC times)."""

    last_refresh_at: datetime | None = None
    last_full_refresh_at: datetime | None = None
    last_refresh_error: str | None = None
    last_refresh_error_at: datetime | None = None


@dataclass(slots=True)
class ManagerMemory:
    """:class:`ManagerSeen` per manager, written by the batcher's hooks."""

    managers: dict[str, ManagerSeen] = field(default_factory=dict)

    def succeeded(self, manager: str, *, full: bool, at: datetime) -> None:
        seen = self.managers.setdefault(manager, ManagerSeen())
        seen.last_refresh_at = at
        if full:
            seen.last_full_refresh_at = at

    def failed(self, manager: str, *, message: str, at: datetime) -> None:
        seen = self.managers.setdefault(manager, ManagerSeen())
        seen.last_refresh_error = message[:4000]
        seen.last_refresh_error_at = at

    def get(self, manager: str) -> ManagerSeen:
        return self.managers.get(manager) or ManagerSeen()


class Liveness:
    """Whether the pipeline can make progress; the reasons when it cannot."""

    def __init__(
        self,
        *,
        batcher: Callable[[], Batcher | None],
        catchers: Sequence[Catcher],
        clock: Clock,
        shutdown_timeout: float,
    ) -> None:
        self._batcher = batcher
        self._catchers = catchers
        self._clock = clock
        self._stall_limit = 3 * shutdown_timeout + STALL_GRACE
        self._last_progress = clock.now()

    def progressed(self) -> None:
        """A refresh ended (committed or failed)."""
        self._last_progress = self._clock.now()

    def problems(self) -> list[str]:
        """Empty when healthy."""
        b = self._batcher()
        if b is None or not b.running:
            return ["batcher not running"]
        found = []
        for catcher in self._catchers:
            if not catcher.healthy():
                reason = getattr(catcher, "unhealthy_reason", None)
                why = reason() if callable(reason) else None
                found.append(f"catcher {catcher.name} unhealthy" + (f": {why}" if why else ""))
        stalled_for = self._clock.now() - self._last_progress
        if b.pending_count() and b.in_flight_managers() and stalled_for >= self._stall_limit:
            found.append(f"no refresh ended for {stalled_for:.0f}s with targets pending")
        return found


class DatabaseWatch:
    """Probes the database; keeps the readiness reason and records what waited for it."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        reasons: set[str],
        on_back: Callable[[], Awaitable[object]],
    ) -> None:
        self._engine = engine
        self._reasons = reasons
        self._on_back = on_back
        self.available = True

    async def probe(self) -> bool:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT), self._engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any driver error or timeout means "away"
            if self.available:
                log.warning("database unavailable: %s", f"{type(exc).__name__}: {exc}".strip())
            self.available = False
            self._reasons.add(DATABASE_UNAVAILABLE)
            return False
        if not self.available:
            log.info("database answers again")
        self.available = True
        self._reasons.discard(DATABASE_UNAVAILABLE)
        return True

    async def run(self) -> None:
        """Probe every ``PROBE_INTERVAL`` until cancelled."""
        while True:
            if await self.probe():
                await self._on_back()
            await asyncio.sleep(PROBE_INTERVAL)
