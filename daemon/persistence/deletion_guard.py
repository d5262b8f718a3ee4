"""The mass-deletion guard: holds back the deletions of a full refresh that would
remove too much, never the rest of it.

Flow: persister (full refresh: pages saved, unseen rows counted) -> **guard** ->
sweep applied or held -> ``refresh_runs`` / logs / metrics / ``/managers``.

A full refresh that would archive/delete more than ``max_delete_ratio`` of the
manager's rows (and more than ``mass_delete_min_rows``) -- a cloud API that
answered an empty list during an outage -- saves every created and updated row
and commits, but removes nothing: the deletion is *held* (DESIGN.md semantic 10,
in the manner of Port Ocean's deletion threshold).  The refresh succeeds, so its
events are acknowledged and the batcher neither retries nor stalls the manager.

A held deletion is applied when

* a later full refresh would remove a share within the threshold (the cloud
  came back, or it really shrank by a little: the guard agrees), or
* an operator confirms it: ``refreshd refresh --manager M --confirm-deletions``
  or ``POST /refresh {"manager": "M", "confirm_deletions": true}`` set
  ``managers.deletions_confirmed_at``; the next full refresh of M, in whichever
  process, applies its deletions whatever their share and clears it in the
  same transaction (a refresh that fails leaves it set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from daemon.persistence import schema
from daemon.persistence.settings import PersisterSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HeldDeletion:
    """The rows a full refresh did not remove because the guard refused."""

    would_remove: int
    total: int
    max_delete_ratio: float

    def message(self, manager: str) -> str:
        return (
            f"manager {manager}: the mass-deletion guard held back the deletions of a full "
            f"refresh: it would archive/delete {self.would_remove} of {self.total} rows "
            f"(> max_delete_ratio {self.max_delete_ratio:g}); created and updated rows were "
            "saved; confirm with `refreshd refresh --manager "
            f"{manager} --confirm-deletions` if the cloud really lost them"
        )

    def as_details(self) -> dict[str, int]:
        return {"rows": self.would_remove, "total": self.total}


class DeletionGuard:
    """Decides, per full refresh, whether its deletions are applied or held."""

    def __init__(self, settings: PersisterSettings) -> None:
        self._settings = settings

    def decide(
        self, manager: str, *, would_remove: int, total: int, confirmed: bool
    ) -> HeldDeletion | None:
        """None: apply the deletions; else what is held.  ``confirmed``: an operator
        confirmed (``managers.deletions_confirmed_at``): apply whatever the share."""
        if confirmed:
            log.warning(
                "manager %s: applying %d confirmed deletion(s) of %d rows",
                manager,
                would_remove,
                total,
            )
            return None
        s = self._settings
        if would_remove > s.mass_delete_min_rows and would_remove > s.max_delete_ratio * max(
            total, 1
        ):
            held = HeldDeletion(would_remove, total, s.max_delete_ratio)
            log.warning("%s", held.message(manager))
            return held
        return None


async def confirm_deletions(conn: AsyncConnection, manager: str, *, now: datetime) -> bool:
    """Arm the next full refresh of ``manager`` to apply its deletions; False: no such manager."""
    m = schema.managers
    done = await conn.execute(
        update(m).where(m.c.name == manager).values(deletions_confirmed_at=now)
    )
    confirmed = done.rowcount > 0
    if confirmed:
        log.info("manager %s: deletions confirmed for its next full refresh", manager)
    return confirmed


async def is_confirmed(conn: AsyncConnection, manager_id: int) -> bool:
    """Whether an operator confirmed the deletions of ``manager_id``'s next full refresh."""
    m = schema.managers
    row = await conn.execute(select(m.c.deletions_confirmed_at).where(m.c.id == manager_id))
    return row.scalar_one_or_none() is not None


async def held_deletions(conn: AsyncConnection) -> dict[int, dict[str, Any]]:
    """Per manager id, the deletion its last successful full refresh held back, if any:
    ``{"rows": n, "total": t, "since": <that refresh's start>}`` (from ``refresh_runs``)."""
    rr = schema.refresh_runs
    last_full = (
        select(func.max(rr.c.id))
        .where(rr.c.kind == "full", rr.c.error.is_(None))
        .group_by(rr.c.manager_id)
    )
    rows = await conn.execute(
        select(rr.c.manager_id, rr.c.details, rr.c.started_at).where(rr.c.id.in_(last_full))
    )
    out: dict[int, dict[str, Any]] = {}
    for manager_id, details, started_at in rows:
        held = (details or {}).get("held_deletion")
        if held:
            out[int(manager_id)] = dict(held) | {"since": started_at.isoformat()}
    return out
