"""The ``rejected_objects`` table and the full refresh's protection of rejected rows.

Flow: persister (row check, database errors, parser rejections) -> **rejects** ->
``rejected_objects``; sweep.

* :meth:`RejectLog.record` upserts one row per rejected object of a manager
  (collection, ref, reason, error, first_seen, last_seen, count), inside the
  refresh's transaction, so the table says exactly what the committed
  inventory lacks.
* :meth:`RejectLog.clear` removes the rows of objects this refresh saved (or,
  after a full refresh, every row it did not reject again: those objects saved
  or are gone).  A targeted refresh pays for it only while the manager has
  rejections.
* :func:`protect` marks the rows a full refresh must not sweep as seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from sqlalchemy import TextClause, bindparam, delete, exists, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from daemon.model.declarations import CollectionRegistry
from daemon.model.rejection import Rejection
from daemon.persistence import schema
from daemon.persistence.db import Dialect
from daemon.persistence.row_check import clean_text
from daemon.persistence.statements import Statements
from daemon.persistence.sweep_scope import Protected

log = logging.getLogger(__name__)

LOGGED_PER_REFRESH = 20
"""Rejections logged one by one per refresh; the rest are summed up in one line."""

ERROR_CHARS = 2000


class RejectLog:
    """Writes ``rejected_objects`` for the managers of one persister."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._has_rows: dict[int, bool] = {}

    def known_clean(self, manager_id: int) -> bool:
        """True when ``manager_id`` is known to have no ``rejected_objects`` rows (as
        this process last saw them), so a save need not clear any."""
        return self._has_rows.get(manager_id) is False

    async def record(
        self,
        conn: AsyncConnection,
        manager: str,
        manager_id: int,
        rejected: Sequence[Rejection],
        *,
        now: datetime,
    ) -> None:
        if not rejected:
            return
        for r in rejected[:LOGGED_PER_REFRESH]:
            log.warning(
                "manager %s: %s %r rejected (%s): %s; the rest of the refresh is saved, "
                "its row is kept and it is retried on its next event or full refresh",
                manager,
                r.collection,
                r.ref,
                r.reason.value,
                r.error,
            )
        if len(rejected) > LOGGED_PER_REFRESH:
            log.warning(
                "manager %s: %d more objects rejected (see rejected_objects)",
                manager,
                len(rejected) - LOGGED_PER_REFRESH,
            )
        unique = {(r.collection, r.ref): r for r in rejected}
        t = schema.rejected_objects
        insert = pg_insert if self._dialect is Dialect.POSTGRESQL else sqlite_insert
        stmt = insert(t).values(
            [
                {
                    "manager_id": manager_id,
                    "collection": r.collection,
                    "ref": r.ref,
                    "reason": r.reason.value,
                    "error": clean_text(r.error[:ERROR_CHARS]),
                    "first_seen": now,
                    "last_seen": now,
                    "count": 1,
                }
                for r in unique.values()
            ]
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.manager_id, t.c.collection, t.c.ref],
            set_={
                "reason": stmt.excluded.reason,
                "error": stmt.excluded.error,
                "last_seen": stmt.excluded.last_seen,
                "count": t.c.count + 1,
            },
        )
        await conn.execute(stmt)
        self._has_rows[manager_id] = True

    async def clear(
        self,
        conn: AsyncConnection,
        manager_id: int,
        *,
        now: datetime,
        saved: Mapping[str, Iterable[str]] | None,
    ) -> None:
        """Forget the rejections of objects saved now; ``saved`` None: of a full refresh
        (every rejection not renewed by this refresh).  A targeted refresh asks the
        database only while this process knows of rejections for the manager; a full
        refresh always does (another process may have recorded some)."""
        if saved is not None and not await self._may_have_rows(conn, manager_id):
            return
        t = schema.rejected_objects
        base = delete(t).where(t.c.manager_id == manager_id, t.c.last_seen < now)
        if saved is None:
            await conn.execute(base)
        else:
            for collection, refs in saved.items():
                ref_list = sorted(set(refs))
                if ref_list:
                    await conn.execute(
                        base.where(t.c.collection == collection, t.c.ref.in_(ref_list))
                    )
        remaining = (
            await conn.execute(select(exists().where(t.c.manager_id == manager_id)))
        ).scalar_one()
        self._has_rows[manager_id] = bool(remaining)

    async def _may_have_rows(self, conn: AsyncConnection, manager_id: int) -> bool:
        known = self._has_rows.get(manager_id)
        if known is None:
            t = schema.rejected_objects
            known = bool(
                (
                    await conn.execute(select(exists().where(t.c.manager_id == manager_id)))
                ).scalar_one()
            )
            self._has_rows[manager_id] = known
        return known


async def protect(
    conn: AsyncConnection,
    protected: Protected,
    *,
    collections: CollectionRegistry,
    statements: Mapping[str, Statements],
    manager_id: int,
) -> None:
    """Mark the protected rows as seen, so the full sweep and the guard leave them be."""
    for name, refs in protected.rows.items():
        if refs:
            table = collections[name].table.name
            sql = (
                f"INSERT INTO {statements[name].seen.name} (id) SELECT t.id FROM {table} t "
                "WHERE t.manager_id = :m AND t.ems_ref IN :refs ON CONFLICT (id) DO NOTHING"
            )
            await conn.execute(_with_refs(sql), {"m": manager_id, "refs": sorted(refs)})
    for name, parents in protected.children.items():
        if parents:
            c = collections[name]
            assert c.parent is not None
            sql = (
                f"INSERT INTO {statements[name].seen.name} (id) SELECT t.id FROM {c.table.name} t "
                f"WHERE t.{c.parent.column} IN (SELECT id FROM {c.parent.collection} "
                "WHERE manager_id = :m AND ems_ref IN :refs) ON CONFLICT (id) DO NOTHING"
            )
            await conn.execute(_with_refs(sql), {"m": manager_id, "refs": sorted(parents)})


def _with_refs(sql: str) -> TextClause:
    return text(sql).bindparams(bindparam("refs", expanding=True))
