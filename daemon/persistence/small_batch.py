"""The small-batch saver: a small targeted refresh in a handful of round trips.

Flow: collector -> parser -> persister -> **small-batch saver** -> tables (+ ``refresh_runs``).

The persister hands a targeted refresh of at most
``PersisterSettings.small_batch_max_targets`` targets here instead of to its
staged path (temp tables filled by COPY, ~25 statements, 14 temp tables
cleared at commit).  Same guarantees, fewer round trips:

* one transaction, serialized per manager: PostgreSQL takes the
  transaction-level advisory lock in the same round trip as ``BEGIN``; SQLite
  holds the process-wide writer lock and ``BEGIN IMMEDIATE``;
* the targeted refresh's pages are merged (one row per key, the last wins)
  and saved at once: on PostgreSQL by ONE statement
  (:mod:`daemon.persistence.small_batch_pg`), on SQLite by a few statements per
  collection (:mod:`daemon.persistence.small_batch_sqlite`), rows passed as parameters;
* scoped deletion (DESIGN.md semantics 2-5), change-only writes with exact
  counts, skeletal rows, reconnected archived rows: as the staged path;
* PostgreSQL: the ``refresh_runs`` row, the manager's status and ``COMMIT``
  go in one round trip (values are rendered as literals: integers,
  timestamps, an enum value and JSON of declared collection names only).

Round trips on PostgreSQL: pool checkout (one ``SELECT 1``, daemon/persistence/db.py),
``BEGIN`` + lock, the statement, record + ``COMMIT``.  A database error that a value
caused (SQLSTATE
classes 22 and 23, or a value the driver cannot encode) rolls back and raises
:class:`SmallBatchRefusedError`; the persister then saves the same pages
through its staged path, which reports (or isolates) the bad value as it does
for any batch.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from daemon.model.declarations import CollectionRegistry
from daemon.model.inventory import InventoryPage, Row
from daemon.model.targets import TargetCollection
from daemon.persistence import schema
from daemon.persistence.db import Dialect, canonical_json, dialect_of
from daemon.persistence.dialect import ADVISORY_NAMESPACE
from daemon.persistence.fencing import (
    EPOCH_FOR_UPDATE,
    FENCE,
    Holding,
    OwnershipLostError,
    check_epoch,
    save_limits_sql,
)
from daemon.persistence.refresh_result import Counts, RefreshKind, RefreshResult
from daemon.persistence.small_batch_pg import PgBatchStatement, pg_batch_statement, read_counts
from daemon.persistence.small_batch_sqlite import (
    SqliteCollectionStatements,
    sqlite_batch_statements,
)
from daemon.persistence.sweeper import removed_counts

log = logging.getLogger(__name__)


class SmallBatchRefusedError(Exception):
    """The database refused a value of the batch; nothing was written.

    The persister saves the batch again through its staged path, which reports
    the bad value as it does for any batch.
    """

    def __init__(self, manager: str, cause: BaseException) -> None:
        super().__init__(f"manager {manager}: small-batch save refused: {cause}")
        self.cause = cause


def merge_pages(
    collections: CollectionRegistry, pages: Iterable[InventoryPage]
) -> dict[str, list[Row]]:
    """The rows of all pages per collection, one per conflict key (the last wins)."""
    merged: dict[str, dict[tuple[Any, ...], Row]] = {}
    for page in pages:
        for name, rows in page.rows.items():
            if name not in collections or not rows:
                continue
            key_attrs = collections[name].conflict_attributes
            by_key = merged.setdefault(name, {})
            for row in rows:
                key = tuple(row.get(a) for a in key_attrs)
                by_key.pop(key, None)  # keep the order of the last occurrence
                by_key[key] = row
    return {name: list(by_key.values()) for name, by_key in merged.items()}


class SmallBatchSaver:
    """Saves small targeted batches of one database (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        collections: CollectionRegistry,
        max_targets: int,
        sqlite_writer: asyncio.Lock,
    ) -> None:
        self._engine = engine
        self._collections = collections
        self._max_targets = max_targets
        self._sqlite_writer = sqlite_writer
        self._dialect = dialect_of(engine)
        self._pg: PgBatchStatement | None = None
        self._sqlite: tuple[SqliteCollectionStatements, ...] | None = None
        timestamp = schema.Timestamp.dialect_impl(engine.dialect)
        self._stamp: Callable[[Any], Any] | None = timestamp.bind_processor(engine.dialect)

    def _timestamp(self, value: datetime) -> Any:
        """``value`` as the dialect stores it (SQLite: SQLAlchemy's text format)."""
        return value if self._stamp is None else self._stamp(value)

    def accepts(self, kind: RefreshKind, targets: TargetCollection | None) -> bool:
        """True for a targeted refresh of at most ``max_targets`` targets."""
        if kind is not RefreshKind.TARGETED or targets is None:
            return False
        return len(targets) <= self._max_targets

    async def save(
        self,
        manager: str,
        pages: Iterable[InventoryPage],
        *,
        manager_id: int,
        targets: TargetCollection,
        now: datetime,
    ) -> RefreshResult:
        """Save ``pages`` with the targeted scope of ``targets`` in one transaction."""
        t0 = time.perf_counter()
        rows = merge_pages(self._collections, pages)
        scope_refs = {
            c.name: sorted(targets.references(c.name)) for c in self._collections.top_level()
        }
        counts: dict[str, Counts] = {c.name: Counts() for c in self._collections}

        def result() -> RefreshResult:
            return RefreshResult(
                manager=manager,
                kind=RefreshKind.TARGETED,
                targets=len(targets),
                counts=counts,
                started_at=now,
                duration=time.perf_counter() - t0,
                trigger=targets.trigger,
            )

        save = self._save_pg if self._dialect is Dialect.POSTGRESQL else self._save_sqlite
        done = await save(manager, manager_id, rows, scope_refs, counts, now, result)
        log.info(
            "manager %s: targeted refresh saved in %.3fs (small batch): %s",
            manager,
            done.duration,
            done.total,
        )
        return done

    # -- PostgreSQL ---------------------------------------------------------------------

    async def _save_pg(
        self,
        manager: str,
        manager_id: int,
        rows: dict[str, list[Row]],
        scope_refs: dict[str, list[str]],
        counts: dict[str, Counts],
        now: datetime,
        result: Any,
    ) -> RefreshResult:
        import asyncpg

        if self._pg is None:
            self._pg = pg_batch_statement(self._collections)
        statement = self._pg
        args = statement.arguments(manager_id, now, rows, scope_refs)
        async with self._engine.connect() as conn:
            driver = await _driver(conn)
            holding = FENCE.get()
            fenced = holding is not None and holding.epoch is not None
            try:
                await driver.execute(_pg_begin(manager_id, holding if fenced else None))
                if fenced:
                    # as daemon.persistence.fencing.verify_fence: commit only under the epoch the
                    # refresh began with; the manager's row stays locked until COMMIT
                    assert holding is not None
                    epoch = await driver.fetchval(EPOCH_FOR_UPDATE, manager_id)
                    if epoch != holding.epoch:
                        await _pg_rollback(conn, driver)
                    check_epoch(manager, holding, epoch)
                row = await driver.fetchrow(statement.sql, *args)
                assert row is not None
                for name, fields in read_counts(statement, tuple(row)).items():
                    counts[name] = counts[name] + Counts(**fields)
                done: RefreshResult = result()
                await driver.execute(_pg_record(manager_id, done, now) + "; COMMIT")
            except asyncpg.PostgresError as exc:
                await _pg_rollback(conn, driver)
                if exc.sqlstate and exc.sqlstate[:2] in ("22", "23"):
                    raise SmallBatchRefusedError(manager, exc) from exc
                raise
            except asyncpg.DataError as exc:  # a value the driver cannot encode
                await _pg_rollback(conn, driver)
                raise SmallBatchRefusedError(manager, exc) from exc
            except OwnershipLostError:
                raise  # rolled back above; the connection is clean
            except BaseException:
                # connection lost or cancelled mid-transaction: never reuse this connection
                await conn.invalidate()
                raise
        return done

    # -- SQLite -------------------------------------------------------------------------

    async def _save_sqlite(
        self,
        manager: str,
        manager_id: int,
        rows: dict[str, list[Row]],
        scope_refs: dict[str, list[str]],
        counts: dict[str, Counts],
        now: datetime,
        result: Any,
    ) -> RefreshResult:
        if self._sqlite is None:
            self._sqlite = sqlite_batch_statements(self._collections)
        base = {"m": manager_id, "now": self._timestamp(now)}
        async with self._sqlite_writer, self._engine.connect() as conn:
            driver = await _driver(conn)
            try:
                await driver.execute_fetchall("BEGIN IMMEDIATE")
                # every upsert first, then every sweep (as the staged path): a skeletal
                # row made for a targeted, absent ref is swept like any other
                for st in self._sqlite:
                    c = st.collection
                    batch = rows.get(c.name)
                    if not batch:
                        continue
                    params = base | {"rows": st.rows_parameter(batch)}
                    for referred, sql in st.skeletal:
                        made = len(await driver.execute_fetchall(sql, params))
                        if made:
                            counts[referred] = counts[referred] + Counts(created=made)
                    flags = await driver.execute_fetchall(st.upsert, params)
                    created = sum(1 for (fresh,) in flags if fresh)
                    counts[c.name] = counts[c.name] + Counts(
                        created=created, updated=len(flags) - created
                    )
                for st in self._sqlite:
                    refs = scope_refs.get(st.scope_of) if st.sweep else None
                    if not st.sweep or not refs:
                        continue
                    c = st.collection
                    params = base | {
                        "rows": st.rows_parameter(rows.get(c.name, [])),
                        "refs": canonical_json(refs),
                    }
                    removed = len(await driver.execute_fetchall(st.sweep, params))
                    counts[c.name] = counts[c.name] + removed_counts(c, removed)
                done: RefreshResult = result()
                await self._sqlite_record(driver, manager_id, done, now)
                await driver.execute_fetchall("COMMIT")
            except sqlite3.Error as exc:
                await _sqlite_rollback(conn, driver)
                if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError):
                    raise SmallBatchRefusedError(manager, exc) from exc
                raise
            except BaseException:
                await conn.invalidate()
                raise
        return done

    async def _sqlite_record(
        self, driver: Any, manager_id: int, result: RefreshResult, now: datetime
    ) -> None:
        total = result.total
        stamp = self._timestamp(now)
        await driver.execute_fetchall(
            "INSERT INTO refresh_runs (manager_id, kind, trigger, targets, created, updated, "
            "archived, deleted, started_at, duration, error, details) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
            (
                manager_id,
                result.kind.value,
                result.trigger.value,
                result.targets,
                total.created,
                total.updated,
                total.archived,
                total.deleted,
                self._timestamp(result.started_at),
                result.duration,
                canonical_json(result.details()),
            ),
        )
        await driver.execute_fetchall(
            "UPDATE managers SET last_refresh_at = ?, last_refresh_error = NULL, "
            "last_refresh_error_at = NULL, updated_at = ? WHERE id = ?",
            (stamp, stamp, manager_id),
        )


async def _driver(conn: AsyncConnection) -> Any:
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    return driver


async def _pg_rollback(conn: AsyncConnection, driver: Any) -> None:
    try:
        await driver.execute("ROLLBACK")
    except BaseException:
        await conn.invalidate()
        raise


async def _sqlite_rollback(conn: AsyncConnection, driver: Any) -> None:
    try:
        if driver.in_transaction:
            await driver.execute_fetchall("ROLLBACK")
    except BaseException:
        await conn.invalidate()
        raise


def _pg_begin(manager_id: int, holding: Holding | None = None) -> str:
    """``BEGIN``, the plan mode, a fenced save's time limits and the manager's lock: one
    round trip.

    The statement is prepared once per connection (asyncpg's statement cache);
    planning its ~25 CTEs takes longer (1.5 ms) than running it for a few vms
    (0.5 ms), so the cached generic plan is always used.  Its joins and sweeps are
    by unique indexes whatever the arrays hold (bench/RESULTS.md: 100k/1k ratio).
    """
    limits = save_limits_sql(holding) if holding is not None else []
    return "; ".join(
        [
            "BEGIN",
            "SET LOCAL plan_cache_mode = force_generic_plan",
            *limits,
            f"SELECT pg_advisory_xact_lock({ADVISORY_NAMESPACE:d}, {manager_id:d})",
        ]
    )


def _literal(value: object) -> str:
    """A PostgreSQL literal for values refreshd generates itself (never input)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, datetime):
        return f"{_literal(value.isoformat())}::timestamptz"
    if isinstance(value, str):
        if "\\" in value or "\x00" in value:
            raise ValueError(f"refusing to render {value!r} as a literal")
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"no literal for {type(value).__name__}")


def _pg_record(manager_id: int, result: RefreshResult, now: datetime) -> str:
    """The ``refresh_runs`` row and the manager's status, as literal SQL (one round trip)."""
    total = result.total
    values = [
        manager_id,
        result.kind.value,
        result.trigger.value,
        result.targets,
        total.created,
        total.updated,
        total.archived,
        total.deleted,
        result.started_at,
        result.duration,
        None,
    ]
    details = f"{_literal(canonical_json(result.details()))}::jsonb"
    t = _literal(now)
    return (
        "INSERT INTO refresh_runs (manager_id, kind, trigger, targets, created, updated, "
        "archived, deleted, started_at, duration, error, details) VALUES ("
        + ", ".join(_literal(v) for v in values)
        + f", {details}); UPDATE managers SET last_refresh_at = {t}, last_refresh_error = NULL, "
        f"last_refresh_error_at = NULL, updated_at = {t} WHERE id = {manager_id:d}"
    )
