"""Fencing: a refresh commits only if its process still owns the manager it began under.

Flow: refresher (begins under a :class:`Holding`) -> persister: **verify_fence**
inside the save transaction -> commit.

Taking a manager (daemon/pipeline/ownership.py) increments ``managers.owner_epoch``.
A refresh carries the holding it began under in :data:`FENCE` (a context
variable, so it follows the refresh into any task it starts).  Inside the save
transaction :func:`verify_fence` re-reads the epoch ``FOR UPDATE``: if another
process took the manager since, nothing is committed
(:class:`OwnershipLostError`); otherwise the manager's row stays locked until
the commit, so a takeover (which updates that row) waits for it and the new
owner's first collect starts after this commit.  The transaction may wait idle
(for the collector's next page) at most ``save_idle_timeout``: a process that
hangs inside it does not hold the manager's rows for ever.  On SQLite holdings carry no
epoch and nothing is checked.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


class OwnershipLostError(Exception):
    """Another process took the manager since this refresh started: nothing was committed.

    The batcher keeps the targets (their events stay unacknowledged) and retries
    once this process owns the manager again.
    """

    retry_after = 1.0

    def __init__(self, manager: str, detail: str) -> None:
        super().__init__(f"manager {manager}: {detail}")
        self.manager = manager


@dataclass(frozen=True, slots=True)
class Holding:
    """This process owns ``manager`` since ``since`` (wall time) under fencing ``epoch``."""

    manager: str
    instance: str
    since: datetime
    epoch: int | None
    """``managers.owner_epoch`` when it was taken; None: no fencing (SQLite)."""
    save_idle_timeout: float | None = None
    """Seconds a save transaction may wait idle (for the collector's next page), and
    one of its statements may run, before the server ends it: bounds how long a hung
    process holds the manager's row and the rows it wrote; None: no limit."""


FENCE: ContextVar[Holding | None] = ContextVar("refreshd_ownership_fence", default=None)
"""The holding a refresh started under; the persister checks it before committing."""


def check_epoch(manager: str, holding: Holding, epoch: object) -> None:
    """Raise :class:`OwnershipLostError` unless ``epoch`` (``managers.owner_epoch`` read
    ``FOR UPDATE`` in the save transaction) is the one the refresh began under."""
    if epoch != holding.epoch:
        raise OwnershipLostError(
            manager,
            f"taken over by another process (epoch {epoch}, this refresh began under "
            f"{holding.epoch}); not committed",
        )


def save_limits_sql(holding: Holding) -> list[str]:
    """``SET LOCAL`` statements bounding a save transaction under ``holding``.

    idle: waiting for the collector's next page; statement: a COPY whose client
    stopped sending is "active", not idle, and would hold its locks for ever.
    """
    if not holding.save_idle_timeout:
        return []
    milliseconds = max(1, int(holding.save_idle_timeout * 1000))
    return [
        f"SET LOCAL idle_in_transaction_session_timeout = {milliseconds:d}",
        f"SET LOCAL statement_timeout = {milliseconds:d}",
    ]


EPOCH_FOR_UPDATE = "SELECT owner_epoch FROM managers WHERE id = $1 FOR UPDATE"
"""The fence's read of the manager's epoch (asyncpg placeholder); locks its row until commit."""


async def verify_fence(conn: AsyncConnection, manager: str, manager_id: int) -> None:
    """Inside a save transaction: refuse to go on if ``manager`` changed hands since the
    refresh began; otherwise lock the manager's row until commit (a takeover waits)."""
    holding = FENCE.get()
    if holding is None or holding.epoch is None:
        return
    epoch = (
        await conn.execute(
            text("SELECT owner_epoch FROM managers WHERE id = :id FOR UPDATE"), {"id": manager_id}
        )
    ).scalar()
    check_epoch(manager, holding, epoch)
    for statement in save_limits_sql(holding):
        await conn.execute(text(statement))
