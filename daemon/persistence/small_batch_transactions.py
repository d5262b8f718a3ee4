"""The small-batch saver's transactions: PostgreSQL's (a few round trips) and SQLite's.

Flow: persister -> small-batch saver -> **small-batch transaction** (lock, save, record) -> tables.

PostgreSQL: ``BEGIN``, the plan mode, a fenced save's time limits and the manager's
advisory lock in one round trip; the epoch check (fenced saves); the one statement
(:mod:`daemon.persistence.small_batch_pg`); the ``refresh_runs`` row, the manager's
status and ``COMMIT`` in one round trip, rendered as literals (integers, timestamps,
an enum value and JSON of declared collection names only).  SQLite: the process-wide
writer lock and ``BEGIN IMMEDIATE``, every upsert then every sweep
(:mod:`daemon.persistence.small_batch_sqlite`), the record, ``COMMIT``.  A database error
that a value caused rolls back and raises :class:`SmallBatchRefusedError`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from daemon.model.inventory import Row
from daemon.persistence.db import canonical_json
from daemon.persistence.dialect import ADVISORY_NAMESPACE
from daemon.persistence.fencing import (
    EPOCH_FOR_UPDATE,
    FENCE,
    Holding,
    OwnershipLostError,
    check_epoch,
    save_limits_sql,
)
from daemon.persistence.refresh_result import Counts, RefreshResult
from daemon.persistence.small_batch_pg import PgBatchStatement, read_counts
from daemon.persistence.small_batch_sqlite import SqliteCollectionStatements
from daemon.persistence.sweeper import removed_counts


class SmallBatchRefusedError(Exception):
    """The database refused a value of the batch; nothing was written.

    The persister saves the batch again through its staged path, which reports
    the bad value as it does for any batch.
    """

    def __init__(self, manager: str, cause: BaseException) -> None:
        super().__init__(f"manager {manager}: small-batch save refused: {cause}")
        self.cause = cause


@dataclass(frozen=True, slots=True)
class SmallBatch:
    """One small targeted batch being saved: its rows per collection (merged), the refs
    its sweeps are scoped to, the counts it adds up, and its result once counted."""

    manager: str
    manager_id: int
    rows: dict[str, list[Row]]
    scope_refs: dict[str, list[str]]
    counts: dict[str, Counts]
    now: datetime
    result: Callable[[], RefreshResult]


async def save_pg(
    engine: AsyncEngine, statement: PgBatchStatement, small: SmallBatch
) -> RefreshResult:
    """Save ``batch`` on PostgreSQL: ``BEGIN`` + lock, the statement, record + ``COMMIT``."""
    import asyncpg

    manager, manager_id, counts, now = small.manager, small.manager_id, small.counts, small.now
    args = statement.arguments(manager_id, now, small.rows, small.scope_refs)
    async with engine.connect() as conn:
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
            done = small.result()
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


async def save_sqlite(
    engine: AsyncEngine,
    statements: tuple[SqliteCollectionStatements, ...],
    *,
    writer: asyncio.Lock,
    stamp: Callable[[datetime], Any],
    small: SmallBatch,
) -> RefreshResult:
    """Save ``batch`` on SQLite, under the writer lock: upserts, then sweeps, record, ``COMMIT``."""
    manager, manager_id, rows, counts = small.manager, small.manager_id, small.rows, small.counts
    base = {"m": manager_id, "now": stamp(small.now)}
    async with writer, engine.connect() as conn:
        driver = await _driver(conn)
        try:
            await driver.execute_fetchall("BEGIN IMMEDIATE")
            # every upsert first, then every sweep (as the staged path): a skeletal
            # row made for a targeted, absent ref is swept like any other
            for st in statements:
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
            for st in statements:
                refs = small.scope_refs.get(st.scope_of) if st.sweep else None
                if not st.sweep or not refs:
                    continue
                c = st.collection
                params = base | {
                    "rows": st.rows_parameter(rows.get(c.name, [])),
                    "refs": canonical_json(refs),
                }
                removed = len(await driver.execute_fetchall(st.sweep, params))
                counts[c.name] = counts[c.name] + removed_counts(c, removed)
            done = small.result()
            await _sqlite_record(driver, manager_id, done, stamp(small.now), stamp)
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


_INSERT_RUN = (
    "INSERT INTO refresh_runs (manager_id, kind, trigger, targets, created, updated, "
    "archived, deleted, started_at, duration, error, details) VALUES "
)


def _run_values(manager_id: int, result: RefreshResult, started_at: Any) -> list[Any]:
    """The ``refresh_runs`` values of a saved refresh, ``manager_id`` to ``duration``."""
    total = result.total
    return [
        manager_id,
        result.kind.value,
        result.trigger.value,
        result.targets,
        total.created,
        total.updated,
        total.archived,
        total.deleted,
        started_at,
        result.duration,
    ]


async def _sqlite_record(
    driver: Any,
    manager_id: int,
    result: RefreshResult,
    now: Any,
    stamp: Callable[[datetime], Any],
) -> None:
    """The ``refresh_runs`` row and the manager's status (``now``: as SQLite stores it)."""
    values = _run_values(manager_id, result, stamp(result.started_at))
    await driver.execute_fetchall(
        _INSERT_RUN + "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
        (*values, canonical_json(result.details())),
    )
    await driver.execute_fetchall(
        "UPDATE managers SET last_refresh_at = ?, last_refresh_error = NULL, "
        "last_refresh_error_at = NULL, updated_at = ? WHERE id = ?",
        (now, now, manager_id),
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
    values = [*_run_values(manager_id, result, result.started_at), None]
    details = f"{_literal(canonical_json(result.details()))}::jsonb"
    t = _literal(now)
    return (
        _INSERT_RUN
        + "("
        + ", ".join(_literal(v) for v in values)
        + f", {details}); UPDATE managers SET last_refresh_at = {t}, last_refresh_error = NULL, "
        f"last_refresh_error_at = NULL, updated_at = {t} WHERE id = {manager_id:d}"
    )
