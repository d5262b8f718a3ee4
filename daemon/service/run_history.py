"""What the database remembers of past refreshes, read once at start-up.

Flow: database (``refresh_runs``, ``managers``) -> **run history** -> batcher cost
estimates, freshness gauges, the scheduler's first plan.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.persistence import schema
from daemon.persistence.refresh_result import RefreshKind
from daemon.pipeline.batcher import Batcher


async def seed_costs(engine: AsyncEngine, batcher: Batcher, runs_per_manager: int = 20) -> None:
    """Start from the durations of each manager's recent successful refreshes in
    ``refresh_runs`` (oldest first), so that a daemon started on a backlog times its
    batches and decides escalation from measurements, not from the threshold alone."""
    r, m = schema.refresh_runs, schema.managers
    recent = (
        select(m.c.name, r.c.kind, r.c.targets, r.c.duration, r.c.id)
        .join(m, m.c.id == r.c.manager_id)
        .where(r.c.error.is_(None))
        .order_by(r.c.id.desc())
        .limit(runs_per_manager * 20)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(recent)).all()
    newest: dict[str, list[Any]] = {}
    for row in rows:  # newest first
        kept = newest.setdefault(row.name, [])
        if len(kept) < runs_per_manager:
            kept.append(row)
    for row in reversed([row for kept in newest.values() for row in kept]):
        kind = RefreshKind.FULL if row.kind == RefreshKind.FULL.value else RefreshKind.TARGETED
        batcher.record_cost(row.name, kind, targets=row.targets, duration=row.duration)


async def last_success(engine: AsyncEngine) -> dict[str, dict[str, float]]:
    """Per manager and kind, when its last successful refresh started (Unix seconds; a
    conservative seed for the freshness gauge, which later runs set to their end)."""
    runs, m = schema.refresh_runs, schema.managers
    query = (
        select(m.c.name, runs.c.kind, func.max(runs.c.started_at))
        .join(m, m.c.id == runs.c.manager_id)
        .where(runs.c.error.is_(None))
        .group_by(m.c.name, runs.c.kind)
    )
    out: dict[str, dict[str, float]] = {}
    async with engine.connect() as conn:
        for name, kind, started in (await conn.execute(query)).all():
            if started is not None:
                if started.tzinfo is None:
                    started = started.replace(tzinfo=UTC)
                out.setdefault(name, {})[kind] = started.timestamp()
    return out


async def last_full_of(engine: AsyncEngine, name: str) -> datetime | None:
    """When manager ``name`` was last fully refreshed (``managers.last_full_refresh_at``)."""
    m = schema.managers
    async with engine.connect() as conn:
        value: datetime | None = (
            await conn.execute(select(m.c.last_full_refresh_at).where(m.c.name == name))
        ).scalar()
    return value


async def last_full(engine: AsyncEngine) -> dict[str, datetime | None]:
    """:func:`last_full_of` for every manager the database knows."""
    m = schema.managers
    async with engine.connect() as conn:
        rows = (await conn.execute(select(m.c.name, m.c.last_full_refresh_at))).all()
    return {r.name: r.last_full_refresh_at for r in rows}
