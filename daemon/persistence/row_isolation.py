"""Row isolation: when the database refuses a batch because of one row, save the others.

Flow: persister (page of one collection) -> **row isolation** -> stage + upsert.

The row check (:mod:`daemon.persistence.row_check`) catches what it can foresee before any
round trip.  Whatever it cannot (a constraint or trigger an operator added, a
driver that refuses a value) fails the statement that saves the batch.  Here
when the persister saves again isolating (:meth:`daemon.persistence.persister.Persister.save`),
each batch runs under a savepoint; when the database refuses it with a data or
integrity error (SQLSTATE classes 22 and 23, their SQLite equivalents, a value
the driver cannot encode), the savepoint is rolled back and the batch is split
in halves, recursively, until the failing rows stand alone: they are rejected,
every other row is saved.  A batch of n rows with k bad ones costs about
``2k log2(n)`` extra saves; a clean batch costs one savepoint.

Any other error (connection lost, a bug) is raised: the refresh fails and is retried.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from daemon.model.inventory import Row

T = TypeVar("T")

DATA_SQLSTATE_CLASSES = frozenset({"22", "23"})


def is_row_error(exc: BaseException) -> bool:
    """The database (or driver) refused a value of a row, not the statement or the connection."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlite3.IntegrityError | sqlite3.DataError):
            return True
        if isinstance(current, UnicodeEncodeError | OverflowError):
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in DATA_SQLSTATE_CLASSES:
            return True
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


async def save_isolating(
    conn: AsyncConnection,
    rows: list[Row],
    save: Callable[[list[Row]], Awaitable[T]],
    *,
    reject: Callable[[Row, BaseException], None],
) -> list[tuple[list[Row], T]]:
    """Save ``rows`` with ``save`` under savepoints; returns each saved part with its result.

    ``reject`` is called for every row the database refused on its own.
    """
    try:
        async with conn.begin_nested():
            result = await save(rows)
    except Exception as exc:
        if not is_row_error(exc):
            raise
        if len(rows) == 1:
            reject(rows[0], exc)
            return []
        mid = len(rows) // 2
        first = await save_isolating(conn, rows[:mid], save, reject=reject)
        return first + await save_isolating(conn, rows[mid:], save, reject=reject)
    return [(rows, result)]


def short_error(exc: BaseException) -> str:
    """The database's own message (first line), without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None)
    message = str(orig if orig is not None else exc).strip().splitlines()
    text = message[0] if message else type(exc).__name__
    return f"{type(orig if orig is not None else exc).__name__}: {text}"[:500]
