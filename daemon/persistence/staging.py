"""Loading parsed rows into per-connection stage tables, as fast as each database allows.

Flow: parser -> **stage tables** -> upsert statements -> tables.

On PostgreSQL rows go in with binary ``COPY`` (asyncpg ``copy_records_to_table``),
the fastest bulk path; on SQLite with one ``executemany``.  The temporary
tables (``stage_*`` and ``seen_*``) are created once per database connection
(the pool keeps connections open), so a refresh rarely pays any DDL.  On PostgreSQL they are
``ON COMMIT DELETE ROWS``; on SQLite :meth:`Stager.reset` empties them at the
start of each refresh.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from operator import itemgetter
from typing import Any

from sqlalchemy import JSON
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.schema import CreateTable

from daemon.model.inventory import Row
from daemon.persistence.canonical_json import canonical_json
from daemon.persistence.db import Dialect, dialect_of
from daemon.persistence.statements import Statements

TEMP_TABLES_READY = "refreshd_temp_tables"
"""Key in the DBAPI connection's ``info``: the temp tables exist on this connection."""


def _ddl(engine: AsyncEngine, statements: Iterable[Statements]) -> list[str]:
    return [
        str(CreateTable(t, if_not_exists=True).compile(dialect=engine.dialect))
        for st in statements
        for t in (st.stage, st.seen)
    ]


@cache
def _json_columns(st: Statements) -> tuple[int, ...]:
    return tuple(i for i, col in enumerate(st.stage.columns) if isinstance(col.type, JSON))


@cache
def _key_positions(st: Statements) -> tuple[int, ...]:
    """Positions, in a record, of the attributes that identify a row (parent + key)."""
    c = st.collection
    return tuple(c.staged_attributes.index(a) for a in c.conflict_attributes)


def to_records(st: Statements, rows: Sequence[Row]) -> list[tuple[Any, ...]]:
    """Rows as tuples in stage column order, JSON in its canonical text form.

    One record per key (the last row wins): an upsert may touch a row only once.
    """
    attrs = st.collection.staged_attributes
    json_cols = _json_columns(st)
    get = itemgetter(*attrs)
    records: list[tuple[Any, ...]] = []
    for row in rows:
        try:
            values = get(row)
        except KeyError:  # a missing attribute is saved as NULL
            values = tuple(row.get(a) for a in attrs)
        if len(attrs) == 1:
            values = (values,)
        if json_cols:
            listed = list(values)
            for i in json_cols:
                if listed[i] is not None:
                    listed[i] = canonical_json(listed[i])
            values = tuple(listed)
        records.append(values)
    return _dedupe(st, records)


def _dedupe(st: Statements, records: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    if len(records) < 2:
        return records
    key_of = itemgetter(*_key_positions(st))
    if len(set(map(key_of, records))) == len(records):
        return records
    return list({key_of(r): r for r in records}.values())


class Stager:
    """Loads rows into the stage tables of one connection inside its transaction."""

    def __init__(self, conn: AsyncConnection, engine: AsyncEngine) -> None:
        self._conn = conn
        self._dialect = dialect_of(engine)
        self._dirty: set[str] = set()

    async def prepare(self, statements: Iterable[Statements], engine: AsyncEngine) -> None:
        """Create the temp tables on this connection once; empty what SQLite kept.

        On PostgreSQL a rolled-back transaction also drops the tables it created:
        the writer clears :data:`TEMP_TABLES_READY` on rollback.
        """
        statements = list(statements)
        if not self._conn.info.get(TEMP_TABLES_READY):
            for ddl in _ddl(engine, statements):
                await self._conn.exec_driver_sql(ddl)
            self._conn.info[TEMP_TABLES_READY] = True
        if self._dialect is Dialect.POSTGRESQL:
            # COPY goes through the raw asyncpg connection: make sure SQLAlchemy has begun
            # the transaction on it first, whatever statement order the caller uses
            await self._conn.exec_driver_sql("SELECT 1")
        if self._dialect is Dialect.SQLITE:
            for st in statements:
                await self._conn.exec_driver_sql(f"DELETE FROM {st.stage.name}")
                await self._conn.exec_driver_sql(f"DELETE FROM {st.seen.name}")

    async def load(self, st: Statements, rows: Sequence[Row]) -> int:
        """Replace the content of ``st``'s stage table with ``rows``; returns how many
        rows were staged (one per key)."""
        name = st.stage.name
        records = to_records(st, rows)
        columns = list(st.collection.staged_attributes)
        if self._dialect is Dialect.POSTGRESQL:
            raw = await self._conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            if name in self._dirty:
                await driver.execute(f"TRUNCATE {name}")
            await driver.copy_records_to_table(name, records=records, columns=columns)
        else:
            if name in self._dirty:
                await self._conn.exec_driver_sql(f"DELETE FROM {name}")
            placeholders = ", ".join("?" for _ in columns)
            await self._conn.exec_driver_sql(
                f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({placeholders})", records
            )
        self._dirty.add(name)
        return len(records)
