"""Progress of the refreshes in flight: pages and rows saved so far, rows per second.

Flow: refresher -> collector pages -> **progress** -> persister; read by ``/managers``,
the status page (``GET /``) and the log.

The refresher counts each page on its way from the collector to the persister
(:func:`counted`), so the figures are what the persister has been handed.  A
refresh that runs longer than ``log_every`` seconds logs one line every
``log_every`` seconds (``manager X: full refresh in progress: 40 pages, 20000
rows, 4100 rows/s``), and a last one when it ends, so a 60-second full refresh
of 100k vms is not two lines an hour apart.  Time is the given clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from daemon.model.inventory import InventoryPage
from daemon.model.targets import Trigger
from daemon.persistence.refresh_result import RefreshKind

log = logging.getLogger(__name__)

LOG_EVERY = 5.0
"""Seconds between two progress lines of one long refresh."""


@dataclass(slots=True)
class Progress:
    """One refresh in flight."""

    manager: str
    kind: RefreshKind
    trigger: Trigger
    targets: int
    started: float
    """On the board's clock."""
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    pages: int = 0
    rows: int = 0
    logged_at: float = 0.0

    def as_dict(self, now: float) -> dict[str, Any]:
        seconds = max(now - self.started, 0.0)
        return {
            "kind": self.kind.value,
            "trigger": self.trigger.value,
            "targets": self.targets,
            "started_at": self.started_at.isoformat(),
            "seconds": round(seconds, 3),
            "pages": self.pages,
            "rows": self.rows,
            "rows_per_second": round(self.rows / seconds, 1) if seconds > 0 else None,
        }


class ProgressBoard:
    """The refreshes in flight, by manager (one per manager at a time)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, log_every: float = LOG_EVERY
    ) -> None:
        self._clock = clock
        self._log_every = log_every
        self._running: dict[str, Progress] = {}

    def start(self, manager: str, *, kind: RefreshKind, trigger: Trigger, targets: int) -> Progress:
        now = self._clock()
        progress = Progress(manager, kind, trigger, targets, started=now, logged_at=now)
        self._running[manager] = progress
        return progress

    def page(self, progress: Progress, rows: int) -> None:
        progress.pages += 1
        progress.rows += rows
        now = self._clock()
        if now - progress.logged_at >= self._log_every:
            progress.logged_at = now
            self._log(progress, now, "in progress")

    def finish(self, progress: Progress) -> None:
        now = self._clock()
        if self._running.get(progress.manager) is progress:
            del self._running[progress.manager]
        if now - progress.started >= self._log_every:
            self._log(progress, now, "ended after")

    def current(self, manager: str) -> dict[str, Any] | None:
        """The manager's refresh in flight as ``/managers`` shows it, or None."""
        progress = self._running.get(manager)
        return progress.as_dict(self._clock()) if progress is not None else None

    def _log(self, p: Progress, now: float, what: str) -> None:
        seconds = max(now - p.started, 1e-9)
        log.info(
            "manager %s: %s refresh %s %.0fs: %d pages, %d rows, %.0f rows/s",
            p.manager,
            p.kind.value,
            what,
            seconds,
            p.pages,
            p.rows,
            p.rows / seconds,
        )


async def counted(
    pages: AsyncIterator[InventoryPage], board: ProgressBoard, progress: Progress
) -> AsyncGenerator[InventoryPage, None]:
    """``pages``, each counted on ``progress`` as it is handed on."""
    async for page in pages:
        board.page(progress, sum(len(rows) for rows in page.rows.values()))
        yield page
