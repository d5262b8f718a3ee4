"""The persister: the facade that saves parsed inventory for one manager with a scoped deletion.

Flow: collector -> parser -> **persister** -> tables (+ ``refresh_runs``).

Guarantees (DESIGN.md semantics 1-6 and 10):

* A refresh is one transaction, serialized per manager (PostgreSQL
  transaction-level advisory lock across processes; on SQLite one writer per
  process), and committed only if the process still owns the manager under
  the epoch the refresh began with (daemon/pipeline/ownership.py, ``verify_fence``).
  A full refresh streams: the collector's pages, merged into save batches
  (daemon.pipeline.page_batches), are staged and saved as they arrive; only the ids of
  seen rows accumulate, in the database.  Only new and changed rows are written
  (daemon.persistence.diff_statements).
* Scope FULL: every row of the manager is in scope; rows not seen are
  archived (top level) or deleted (children).  Scope TARGETED: a targeted
  top-level collection's scope is exactly the targeted refs, a child
  collection's scope the children of targeted parents; collections that were
  only referred to are upserted, never swept.
* Only changed rows are written, so saving the same inventory twice writes
  nothing; counts are exact.  Missing references become skeletal rows;
  archived rows that reappear are reconnected (same id).
* A full refresh that would archive/delete more than ``max_delete_ratio`` of
  the manager's rows saves everything else and holds the deletions back
  (:mod:`daemon.persistence.deletion_guard`).
* One bad object does not stop the refresh (semantic 13): rows are normalised
  and checked before they are written (:mod:`daemon.persistence.row_check`), rows the
  database still refuses are isolated (:mod:`daemon.persistence.row_isolation`); rejected
  objects are recorded (:mod:`daemon.persistence.rejects`) and never treated as gone
  (:mod:`daemon.persistence.sweep_scope`), nor are children a targeted page did not cover.

The pieces, by concern: the transaction and page loop (:mod:`daemon.persistence.saver`),
sweeps and the mass-deletion guard (:mod:`daemon.persistence.sweeper`), the manager
registry and ``refresh_runs`` (:mod:`daemon.persistence.runs`), locks, ANALYZE and the
SQLite writer lock (:mod:`daemon.persistence.dialect`), child -> parent targets
(:mod:`daemon.persistence.target_resolution`), small targeted batches
(:mod:`daemon.persistence.small_batch`).  This module chooses the path and isolates rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.declarations import CollectionRegistry, Retention
from daemon.model.inventory import COLLECTIONS, InventoryPage, Row
from daemon.model.rejection import RejectReason
from daemon.model.targets import TargetCollection, Trigger
from daemon.persistence.deletion_guard import DeletionGuard, confirm_deletions
from daemon.persistence.dialect import Writer
from daemon.persistence.refresh_result import RefreshKind, RefreshResult
from daemon.persistence.rejects import RejectLog
from daemon.persistence.row_check import RowChecker
from daemon.persistence.row_isolation import is_row_error, short_error
from daemon.persistence.runs import FailureLog, Managers
from daemon.persistence.saver import Pages, StagedSaver, each
from daemon.persistence.settings import PersisterSettings
from daemon.persistence.small_batch import SmallBatchSaver
from daemon.persistence.small_batch_transactions import SmallBatchRefusedError
from daemon.persistence.statements import Statements, statements_for
from daemon.persistence.sweeper import Sweeper
from daemon.persistence.target_resolution import TargetResolver, cleaned_targets
from daemon.pipeline.page_batches import FULL_BATCH_ROWS

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Persister:
    """Saves inventory pages for managers of one database."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        collections: CollectionRegistry = COLLECTIONS,
        settings: PersisterSettings | None = None,
        now: Callable[[], datetime] = utcnow,
        full_batch_rows: int = FULL_BATCH_ROWS,
    ) -> None:
        self._engine = engine
        self._collections = collections
        self._settings = settings or PersisterSettings()
        self._now = now
        self._writer = Writer(engine)
        statements: dict[str, Statements] = {c.name: statements_for(c) for c in collections}
        self._checkers = {c.name: RowChecker(c) for c in collections}
        self._rejects = RejectLog(self._writer.dialect)
        self._managers = Managers(self._writer, now)
        self._failures = FailureLog(self._writer, now)
        self._targets = TargetResolver(engine, collections)
        self._isolating: set[str] = set()  # managers whose full refreshes save row by row
        self._staged = StagedSaver(
            self._writer,
            collections=collections,
            statements=statements,
            checkers=self._checkers,
            sweeper=Sweeper(collections, statements, DeletionGuard(self._settings)),
            rejects=self._rejects,
            now=now,
            full_batch_rows=full_batch_rows,
        )
        self._small_batch = SmallBatchSaver(
            engine,
            collections=collections,
            max_targets=self._settings.small_batch_max_targets,
            sqlite_writer=self._writer.sqlite_lock,
        )

    @property
    def collections(self) -> CollectionRegistry:
        return self._collections

    async def ensure_manager(self, name: str, provider: str) -> int:
        """The id of manager ``name``, creating its row on first use (several processes
        starting together may race to create it: the loser reads the winner's row)."""
        return await self._managers.ensure(name, provider)

    async def resolve_targets(self, targets: TargetCollection) -> TargetCollection:
        """Turn targets on child collections into targets on their parents
        (:meth:`daemon.persistence.target_resolution.TargetResolver.resolve`)."""
        children = self._targets.children_targeted(targets)
        if not children:
            return targets
        manager_id = self._managers.id_of(targets.manager)
        return await self._targets.resolve(targets, manager_id, children)

    async def confirm_deletions(self, manager: str) -> None:
        """Let the next full refresh of ``manager`` apply deletions the guard would hold."""
        async with self._writer.begin() as conn:
            if not await confirm_deletions(conn, manager, now=self._now()):
                raise LookupError(f"unknown manager {manager!r}")

    async def save(
        self,
        manager: str,
        pages: Pages,
        *,
        targets: TargetCollection | None = None,
    ) -> RefreshResult:
        """Save ``pages`` in one transaction; scope FULL when ``targets`` is None or full.

        Rows are saved without savepoints (no subtransactions on the fast path).  When the
        database refuses a row the row check did not foresee, the refresh is saved again
        *isolating* (each collection of a page under a savepoint, a refused batch bisected:
        :mod:`daemon.persistence.row_isolation`): at once when ``pages`` is a sequence (a targeted
        refresh's pages are collected first), else (a streamed full refresh) by its retry,
        and by the manager's full refreshes as long as the database keeps refusing rows.
        """
        kind = RefreshKind.FULL if targets is None or targets.is_full else RefreshKind.TARGETED
        trigger = targets.trigger if targets is not None else Trigger.MANUAL
        manager_id = self._managers.id_of(manager)  # raises before anything is recorded
        started = self._now()
        t0 = time.perf_counter()

        async def failed(exc: Exception) -> None:
            await self.record_failure(
                manager,
                kind=kind,
                trigger=trigger,
                targets=len(targets) if targets is not None else 1,
                started_at=started,
                duration=time.perf_counter() - t0,
                error=exc,
            )

        if self._small_batch.accepts(kind, targets) and self._rejects.known_clean(manager_id):
            assert targets is not None
            try:
                batch = [page async for page in each(pages)]  # a targeted refresh's: in memory
                pages = batch
                clean = self._clean_pages(batch)
                if clean is not None:
                    return await self._small_batch.save(
                        manager,
                        clean,
                        manager_id=manager_id,
                        targets=cleaned_targets(targets),
                        now=started,
                    )
            except SmallBatchRefusedError as exc:
                log.info("manager %s: %s; saving through the staged path", manager, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await failed(exc)
                raise
        isolate = kind.full and manager in self._isolating

        async def staged(isolate: bool) -> RefreshResult:
            return await self._staged.save(
                manager,
                manager_id,
                pages,
                targets,
                kind=kind,
                isolate=isolate,
                started=started,
                t0=t0,
            )

        try:
            try:
                result = await staged(isolate)
            except Exception as exc:
                if isolate or not is_row_error(exc):
                    raise
                replay = isinstance(pages, Sequence)
                log.warning(
                    "manager %s: the database refused a row of a %s refresh (%s); %s",
                    manager,
                    kind.value,
                    short_error(exc),
                    "saving it again row by row" if replay else "its retry saves row by row",
                )
                if not replay:
                    self._isolating.add(manager)
                    raise
                result = await staged(True)
            if kind.full:  # keep isolating while the database refuses rows of this manager
                if any(r.reason is RejectReason.DATABASE_ERROR for r in result.rejected):
                    self._isolating.add(manager)
                else:
                    self._isolating.discard(manager)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await failed(exc)
            raise
        log.info(
            "manager %s: %s refresh saved in %.3fs: %s",
            manager,
            kind.value,
            result.duration,
            result.total,
        )
        return result

    def _clean_pages(self, pages: list[InventoryPage]) -> list[InventoryPage] | None:
        """``pages`` with their rows checked and normalised, when the small-batch path
        can save them exactly as the staged path would: no object rejected (by the
        parser or the row check) and every child collection covered for the parents
        each page carries.  None: the staged path must save them (it records rejected
        objects and spares what a page did not cover)."""
        out: list[InventoryPage] = []
        for page in pages:
            if page.rejected:
                return None
            rows: dict[str, list[Row]] = {}
            for name, page_rows in page.rows.items():
                if name not in self._collections:
                    continue
                c = self._collections[name]
                if not c.is_child and not all(
                    child.name in page.covers for child in self._collections.children_of(name)
                ):
                    return None
                checked, bad = self._checkers[name].check(page_rows)
                if bad:
                    return None
                rows[name] = checked
            out.append(InventoryPage(rows=rows, expanded=page.expanded, covers=page.covers))
        return out

    async def record_failure(
        self,
        manager: str,
        *,
        kind: RefreshKind,
        targets: int,
        started_at: datetime,
        duration: float,
        error: BaseException,
        trigger: Trigger = Trigger.EVENT,
    ) -> None:
        """Record a failed refresh in ``refresh_runs`` and on the manager (own transaction).

        When the database cannot take it (it is away: that is often why the refresh
        failed), the record is kept in memory (at most ``daemon.persistence.runs.UNRECORDED_MAX``,
        the oldest dropped first) and written by :meth:`record_unrecorded` once it answers again.
        """
        manager_id = self._managers.get(manager)
        if manager_id is None:
            return
        await self._failures.record(
            manager,
            manager_id,
            kind=kind,
            targets=targets,
            started_at=started_at,
            duration=duration,
            error=error,
            trigger=trigger,
        )

    async def record_unrecorded(self) -> int:
        """Write the failures :meth:`record_failure` could not; how many were written."""
        return await self._failures.record_unrecorded()

    async def row_counts(self, manager: str) -> dict[str, int]:
        """Active rows per collection of ``manager`` (for status and tests)."""
        manager_id = self._managers.id_of(manager)
        out: dict[str, int] = {}
        async with self._engine.connect() as conn:
            for c in self._collections:
                t = c.table
                q = select(func.count()).select_from(t).where(t.c.manager_id == manager_id)
                if c.retention is Retention.ARCHIVE:
                    q = q.where(t.c.archived_at.is_(None))
                out[c.name] = (await conn.execute(q)).scalar_one()
        return out
