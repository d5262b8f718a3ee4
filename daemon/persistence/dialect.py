"""Where the dialects differ in a save: the manager's lock, ANALYZE, the SQLite writer lock.

Flow: persister -> saver, small-batch saver -> **dialect** (lock, ANALYZE, writer) -> database.

* PostgreSQL serializes refreshes of one manager across processes with a
  transaction-level advisory lock (``ADVISORY_NAMESPACE``, manager id); SQLite
  has one writer at a time, so a process holds its writer lock around every
  write transaction (:class:`Writer`).
* PostgreSQL re-ANALYZEs the tables a refresh grows a lot, inside its
  transaction (:func:`analyze_grown`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from daemon.model.declarations import CollectionRegistry
from daemon.persistence.db import Dialect, dialect_of
from daemon.persistence.refresh_result import Counts
from daemon.persistence.staging import TEMP_TABLES_READY

ADVISORY_NAMESPACE = 0x52464844  # "RFHD": first key of pg_advisory_xact_lock(int, int)
ANALYZE_MIN_ROWS = 1000  # rows created in a table by one refresh before it is re-ANALYZEd


async def lock_manager(conn: AsyncConnection, dialect: Dialect, manager_id: int) -> None:
    """Serialize the refreshes of one manager (PostgreSQL; SQLite's writer lock already does)."""
    if dialect is Dialect.POSTGRESQL:
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(:ns, :id)"),
            {"ns": ADVISORY_NAMESPACE, "id": manager_id},
        )


async def analyze_grown(
    conn: AsyncConnection,
    dialect: Dialect,
    collections: CollectionRegistry,
    counts: dict[str, Counts],
    analyzed: dict[str, int],
) -> None:
    """ANALYZE the tables this refresh has grown a lot, inside its transaction.

    Performance only (PostgreSQL).  A refresh that inserts many rows, such as a
    manager's first full refresh, leaves the planner without statistics (or with
    stale ones) on the tables every page joins, and autovacuum cannot help: the
    rows are not committed.  PostgreSQL then picks nested loops that rescan the
    growing tables.  An ANALYZE in the transaction sees its own rows (and its
    statistics commit with it).  It runs when the rows created in a table reach
    ``ANALYZE_MIN_ROWS`` and then each time they double (log2(n) times per
    refresh); ``SKIP_LOCKED``: it never waits for a concurrent VACUUM or ANALYZE.
    See bench/RESULTS.md (100k vms: first full refresh 118 s -> 72 s).
    """
    if dialect is not Dialect.POSTGRESQL:
        return
    for collection in collections:
        created = counts[collection.name].created
        if created >= ANALYZE_MIN_ROWS and created >= 2 * analyzed.get(collection.name, 0):
            await conn.exec_driver_sql(f"ANALYZE (SKIP_LOCKED) {collection.table.name}")
            analyzed[collection.name] = created


class Writer:
    """Write transactions of one database: ``engine.begin()``, under the process-wide
    writer lock on SQLite (shared with the small-batch saver: :attr:`sqlite_lock`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = dialect_of(engine)
        self.sqlite_lock = asyncio.Lock()

    def begin(self) -> WriteTransaction:
        return WriteTransaction(
            self.engine, self.sqlite_lock if self.dialect is Dialect.SQLITE else None
        )


class WriteTransaction:
    """``engine.begin()``, under the process-wide writer lock on SQLite."""

    def __init__(self, engine: AsyncEngine, lock: asyncio.Lock | None) -> None:
        self._engine = engine
        self._lock = lock
        self._cm: Any = None
        self._conn: AsyncConnection | None = None

    async def __aenter__(self) -> AsyncConnection:
        if self._lock is not None:
            await self._lock.acquire()
        try:
            self._cm = self._engine.begin()
            conn: AsyncConnection = await self._cm.__aenter__()
            self._conn = conn
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        return conn

    async def __aexit__(self, *exc: Any) -> None:
        if exc[0] is not None and self._conn is not None:
            # a rollback drops temp tables created in the transaction (PostgreSQL)
            self._conn.info.pop(TEMP_TABLES_READY, None)
        try:
            await self._cm.__aexit__(*exc)
        finally:
            if self._lock is not None:
                self._lock.release()
