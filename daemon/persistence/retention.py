"""Retention of the audit trail: ``refresh_runs`` rows older than ``[persister] keep_runs``.

Flow: persister -> refresh_runs -> **retention** (the daemon prunes periodically).

The daemon prunes once at start and then every ``PRUNE_EVERY`` seconds (on its
clock).  Rows are deleted per manager through the ``(manager_id, started_at)``
index, in chunks, so a first prune of a large table never holds a long lock.
Several daemons sharing a database may prune at once: deleting is idempotent.
``keep_runs = 0`` keeps every row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.persistence import schema
from daemon.pipeline.clock import Clock

log = logging.getLogger(__name__)

PRUNE_EVERY = 3600.0
"""Seconds between two prunes of a running daemon."""
CHUNK = 5000
"""Rows deleted per statement (and per transaction)."""


async def prune_refresh_runs(engine: AsyncEngine, *, older_than: datetime) -> int:
    """Delete the ``refresh_runs`` rows that started before ``older_than``; returns how many."""
    runs = schema.refresh_runs
    async with engine.connect() as conn:
        manager_ids = (await conn.execute(select(schema.managers.c.id))).scalars().all()
    removed = 0
    for manager_id in manager_ids:
        while True:
            old = (
                select(runs.c.id)
                .where(runs.c.manager_id == manager_id, runs.c.started_at < older_than)
                .limit(CHUNK)
                .scalar_subquery()
            )
            async with engine.begin() as conn:
                n = (await conn.execute(delete(runs).where(runs.c.id.in_(old)))).rowcount
            removed += n
            if n < CHUNK:
                break
    return removed


async def prune_forever(
    engine: AsyncEngine,
    *,
    keep: float,
    clock: Clock,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    every: float = PRUNE_EVERY,
) -> None:
    """Prune now and every ``every`` seconds (cancel to stop); ``keep`` 0: never."""
    if keep <= 0:
        return
    while True:
        cutoff = now() - timedelta(seconds=keep)
        try:
            removed = await prune_refresh_runs(engine, older_than=cutoff)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed prune is retried next round
            log.warning("pruning refresh_runs failed (retrying in %.0fs): %s", every, exc)
        else:
            if removed:
                log.info("pruned %d refresh_runs row(s) older than %s", removed, cutoff)
        await clock.sleep_until(clock.now() + every)
