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
``BEGIN`` + lock, the statement, record + ``COMMIT``
(:mod:`daemon.persistence.small_batch_transactions`).  A database error that a value
caused (SQLSTATE classes 22 and 23, or a value the driver cannot encode) rolls back and
raises ``SmallBatchRefusedError``; the persister then saves the same pages
through its staged path, which reports (or isolates) the bad value as it does
for any batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.declarations import CollectionRegistry
from daemon.model.inventory import InventoryPage, Row
from daemon.model.targets import TargetCollection
from daemon.persistence import schema
from daemon.persistence.db import Dialect, dialect_of
from daemon.persistence.refresh_result import Counts, RefreshKind, RefreshResult
from daemon.persistence.small_batch_pg import PgBatchStatement, pg_batch_statement
from daemon.persistence.small_batch_sqlite import (
    SqliteCollectionStatements,
    sqlite_batch_statements,
)
from daemon.persistence.small_batch_transactions import SmallBatch, save_pg, save_sqlite

log = logging.getLogger(__name__)


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

        small = SmallBatch(manager, manager_id, rows, scope_refs, counts, now, result)
        if self._dialect is Dialect.POSTGRESQL:
            if self._pg is None:
                self._pg = pg_batch_statement(self._collections)
            done = await save_pg(self._engine, self._pg, small)
        else:
            if self._sqlite is None:
                self._sqlite = sqlite_batch_statements(self._collections)
            done = await save_sqlite(
                self._engine,
                self._sqlite,
                writer=self._sqlite_writer,
                stamp=self._timestamp,
                small=small,
            )
        log.info(
            "manager %s: targeted refresh saved in %.3fs (small batch): %s",
            manager,
            done.duration,
            done.total,
        )
        return done
