"""The persister: saves parsed inventory for one manager with a scoped deletion.

Flow: collector -> parser -> **persister** -> tables (+ ``refresh_runs``).

Guarantees (DESIGN.md semantics 1-6 and 10):

* A refresh is one transaction, serialized per manager (PostgreSQL
  transaction-level advisory lock across processes; on SQLite one writer per
  process).  A full refresh streams: the collector's pages, merged into save
  batches (daemon.page_batches), are staged and saved as they arrive; only the ids
  of seen rows accumulate, in the database.  Only new and changed rows are written
  (daemon.diff_statements).
* Scope FULL: every row of the manager is in scope; rows not seen are
  archived (top level) or deleted (children).  Scope TARGETED: a targeted
  top-level collection's scope is exactly the targeted refs, a child
  collection's scope the children of targeted parents; collections that were
  only referred to are upserted, never swept.
* Only changed rows are written, so saving the same inventory twice writes
  nothing; counts are exact.  Missing references become skeletal rows;
  archived rows that reappear are reconnected (same id).
* A full refresh that would archive/delete more than ``max_delete_ratio`` of
  the manager's rows is refused: nothing changes, the run is recorded failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from daemon import schema
from daemon.collections import Collection, CollectionRegistry, Retention
from daemon.db import Dialect, dialect_of
from daemon.diff_statements import diff_statements_for
from daemon.inventory import COLLECTIONS, InventoryPage
from daemon.page_batches import FULL_BATCH_ROWS, coalesced
from daemon.refresh_result import Counts, PersisterSettings, RefreshKind, RefreshResult
from daemon.staging import TEMP_TABLES_READY, Stager
from daemon.statements import Statements, statements_for
from daemon.targets import Ref, Target, TargetCollection

log = logging.getLogger(__name__)

ADVISORY_NAMESPACE = 0x52464844  # "RFHD": first key of pg_advisory_xact_lock(int, int)
ANALYZE_MIN_ROWS = 1000  # rows created in a table by one refresh before it is re-ANALYZEd


class MassDeletionRefusedError(Exception):
    """A full refresh would have removed too much of the inventory; nothing was changed."""

    retryable = True

    def __init__(self, manager: str, would_remove: int, total: int, ratio: float) -> None:
        super().__init__(
            f"manager {manager}: full refresh refused by the mass-deletion guard: it would "
            f"archive/delete {would_remove} of {total} rows (> max_delete_ratio {ratio:g}); "
            "inventory left unchanged"
        )
        self.would_remove = would_remove
        self.total = total


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
        self._full_batch_rows = full_batch_rows
        self._collections = collections
        self._settings = settings or PersisterSettings()
        self._now = now
        self._dialect = dialect_of(engine)
        self._statements: dict[str, Statements] = {c.name: statements_for(c) for c in collections}
        self._manager_ids: dict[str, int] = {}
        self._sqlite_writer = asyncio.Lock()

    @property
    def collections(self) -> CollectionRegistry:
        return self._collections

    # -- managers ---------------------------------------------------------------

    async def ensure_manager(self, name: str, provider: str) -> int:
        """The id of manager ``name``, creating its row on first use."""
        if name in self._manager_ids:
            return self._manager_ids[name]
        m = schema.managers
        async with self._write() as conn:
            row = (await conn.execute(select(m.c.id, m.c.provider).where(m.c.name == name))).first()
            if row is None:
                now = self._now()
                manager_id = (
                    await conn.execute(
                        insert(m)
                        .values(name=name, provider=provider, created_at=now, updated_at=now)
                        .returning(m.c.id)
                    )
                ).scalar_one()
            else:
                manager_id = int(row.id)
                if row.provider != provider:
                    await conn.execute(
                        update(m).where(m.c.id == manager_id).values(provider=provider)
                    )
        self._manager_ids[name] = int(manager_id)
        return int(manager_id)

    def _manager_id(self, name: str) -> int:
        try:
            return self._manager_ids[name]
        except KeyError:
            raise LookupError(f"manager {name!r}: call ensure_manager() first") from None

    # -- targets ----------------------------------------------------------------

    async def resolve_targets(self, targets: TargetCollection) -> TargetCollection:
        """Turn targets on child collections into targets on their parents.

        A child ref that names its parent (``{"vm": ...}``) maps directly; one
        known only by its own ems_ref is looked up.  Unknown child refs are
        kept: a provider may know how to expand them (an AWS volume id).
        """
        children = {
            a
            for a in targets.associations()
            if a in self._collections and self._collections[a].is_child
        }
        if not children:
            return targets
        manager_id = self._manager_id(targets.manager)
        out = TargetCollection(targets.manager)
        async with self._engine.connect() as conn:
            for target in targets:
                if target.association not in children:
                    out.add_target(target)
                    continue
                parent_ref = await self._parent_of(conn, manager_id, target)
                if parent_ref is None:
                    out.add_target(target)
                else:
                    out.add_target(
                        Target(
                            target.manager,
                            parent_ref[0],
                            Ref({"ems_ref": parent_ref[1]}),
                            target.event_id,
                        )
                    )
        return out

    async def _parent_of(
        self, conn: AsyncConnection, manager_id: int, target: Target
    ) -> tuple[str, str] | None:
        c = self._collections[target.association]
        assert c.parent is not None
        ref = target.manager_ref
        if c.parent.attribute in ref:
            return (c.parent.collection, ref[c.parent.attribute])
        if "ems_ref" not in ref or "ems_ref" not in c.key:
            return None
        parent = self._collections[c.parent.collection].table
        row = (
            await conn.execute(
                select(parent.c.ems_ref)
                .join(c.table, c.table.c[c.parent.column] == parent.c.id)
                .where(c.table.c.manager_id == manager_id, c.table.c.ems_ref == ref["ems_ref"])
                .limit(1)
            )
        ).first()
        return (c.parent.collection, row.ems_ref) if row else None

    # -- saving -----------------------------------------------------------------

    async def save(
        self,
        manager: str,
        pages: AsyncIterable[InventoryPage],
        *,
        targets: TargetCollection | None = None,
    ) -> RefreshResult:
        """Save ``pages`` in one transaction; scope FULL when ``targets`` is None or full."""
        kind = RefreshKind.FULL if targets is None or targets.is_full else RefreshKind.TARGETED
        manager_id = self._manager_id(manager)
        started = self._now()
        t0 = time.perf_counter()
        counts: dict[str, Counts] = {c.name: Counts() for c in self._collections}
        try:
            async with self._write() as conn:
                await self._lock(conn, manager_id)
                now = self._now()
                params: dict[str, Any] = {"m": manager_id, "now": now}
                stager = Stager(conn, self._engine)
                await stager.prepare(self._statements.values(), self._engine)
                active = await self._count_active(conn, params) if kind.full else {}
                total_before = sum(active.values())
                tracked = self._tracked(kind, targets, active)
                analyzed: dict[str, int] = {}
                # a full refresh saves collector pages merged into larger batches
                batches = (
                    coalesced(pages, min_rows=self._full_batch_rows) if kind.full else _pages(pages)
                )
                async with aclosing(batches):
                    async for page in batches:
                        await self._save_page(conn, stager, page, params, tracked, counts)
                        await self._analyze_grown(conn, counts, analyzed)
                if kind.full:
                    await self._sweep_full(conn, manager, params, total_before, tracked, counts)
                else:
                    assert targets is not None
                    await self._sweep_targeted(conn, targets, params, counts)
                result = RefreshResult(
                    manager=manager,
                    kind=kind,
                    targets=len(targets) if targets is not None else 1,
                    counts=counts,
                    started_at=started,
                    duration=time.perf_counter() - t0,
                )
                await self._record(conn, manager_id, result, now=now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.record_failure(
                manager,
                kind=kind,
                targets=len(targets) if targets is not None else 1,
                started_at=started,
                duration=time.perf_counter() - t0,
                error=exc,
            )
            raise
        log.info(
            "manager %s: %s refresh saved in %.3fs: %s",
            manager,
            kind.value,
            result.duration,
            result.total,
        )
        return result

    async def _analyze_grown(
        self, conn: AsyncConnection, counts: dict[str, Counts], analyzed: dict[str, int]
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
        if self._dialect is not Dialect.POSTGRESQL:
            return
        for collection in self._collections:
            created = counts[collection.name].created
            if created >= ANALYZE_MIN_ROWS and created >= 2 * analyzed.get(collection.name, 0):
                await conn.exec_driver_sql(f"ANALYZE (SKIP_LOCKED) {collection.table.name}")
                analyzed[collection.name] = created

    def _tracked(
        self, kind: RefreshKind, targets: TargetCollection | None, active: dict[str, int]
    ) -> set[str]:
        """Collections whose seen rows must be recorded (those that will be swept).

        A full refresh skips a collection that had no active row when it began and
        that no collection refers to: every row it will hold was saved by this
        refresh (no skeletal row can appear in it), so nothing of it can be swept.
        A manager's first refresh thus records seen rows only for the small
        referenced collections (flavors, images, security groups).
        """
        if kind.full or targets is None:
            referred = {r.collection for c in self._collections for r in c.references}
            return {name for name in self._statements if active.get(name) or name in referred}
        top = {a for a in targets.associations() if a in self._collections}
        return top | {c.name for c in self._collections if c.parent and c.parent.collection in top}

    async def _save_page(
        self,
        conn: AsyncConnection,
        stager: Stager,
        page: InventoryPage,
        params: dict[str, Any],
        tracked: set[str],
        counts: dict[str, Counts],
    ) -> None:
        for collection in self._collections:
            rows = page.rows.get(collection.name)
            if not rows:
                continue
            st = self._statements[collection.name]
            staged = await stager.load(st, rows)
            for referred, statement in st.skeletal:
                made = len((await conn.execute(statement, params)).all())
                if made:
                    counts[referred] = counts[referred] + Counts(created=made)
            # compare before writing (daemon.diff_statements): only new and changed rows
            # are written; created: rows inserted now; updated: rows that existed before
            # this refresh (a row created by an earlier page or a skeletal insert is not
            # counted twice)
            track = collection.name in tracked
            diff = diff_statements_for(collection)
            if self._dialect is Dialect.POSTGRESQL:
                statement = diff.pg_save if track else diff.pg_save_untracked
                created, updated = (await conn.execute(statement, params)).one()
            else:
                updated = 0
                if diff.sqlite_update is not None:
                    fresh_flags = (await conn.execute(diff.sqlite_update, params)).scalars()
                    updated = sum(1 for fresh in fresh_flags if not fresh)
                # mark the stored rows seen first: when every staged row has one (a
                # refresh that changes little), the insert pass is skipped
                matched = (await conn.execute(st.mark_seen, params)).rowcount if track else -1
                created = 0
                if matched != staged:
                    created = (await conn.execute(diff.sqlite_insert, params)).rowcount
                    if track and created:
                        await conn.execute(st.mark_seen, params)
            counts[collection.name] = counts[collection.name] + Counts(
                created=created, updated=updated
            )

    async def _count_active(self, conn: AsyncConnection, params: dict[str, Any]) -> dict[str, int]:
        """Active rows of the manager per collection, before a full refresh."""
        return {
            name: (await conn.execute(st.count_active, params)).scalar_one()
            for name, st in self._statements.items()
        }

    async def _sweep_full(
        self,
        conn: AsyncConnection,
        manager: str,
        params: dict[str, Any],
        total_before: int,
        tracked: set[str],
        counts: dict[str, Counts],
    ) -> None:
        # an untracked collection has nothing to sweep (see _tracked)
        would_remove = 0
        for name in tracked:
            would_remove += (
                await conn.execute(self._statements[name].count_full, params)
            ).scalar_one()
        s = self._settings
        if would_remove > s.mass_delete_min_rows and would_remove > s.max_delete_ratio * max(
            total_before, 1
        ):
            raise MassDeletionRefusedError(manager, would_remove, total_before, s.max_delete_ratio)
        for collection in self._collections:
            if collection.name not in tracked:
                continue
            st = self._statements[collection.name]
            removed = (await conn.execute(st.sweep_full, params)).rowcount
            counts[collection.name] = counts[collection.name] + _removed(collection, removed)

    async def _sweep_targeted(
        self,
        conn: AsyncConnection,
        targets: TargetCollection,
        params: dict[str, Any],
        counts: dict[str, Counts],
    ) -> None:
        for collection in self._collections:
            scope_of = collection.parent.collection if collection.parent else collection.name
            if scope_of in self._collections and self._collections[scope_of].is_child:
                continue
            refs = sorted(targets.references(scope_of))
            if not refs:
                continue
            st = self._statements[collection.name]
            removed = (await conn.execute(st.sweep_targeted, params | {"refs": refs})).rowcount
            counts[collection.name] = counts[collection.name] + _removed(collection, removed)

    async def _record(
        self, conn: AsyncConnection, manager_id: int, result: RefreshResult, *, now: datetime
    ) -> None:
        total = result.total
        await conn.execute(
            insert(schema.refresh_runs).values(
                manager_id=manager_id,
                kind=result.kind.value,
                targets=result.targets,
                created=total.created,
                updated=total.updated,
                archived=total.archived,
                deleted=total.deleted,
                started_at=result.started_at,
                duration=result.duration,
                error=None,
                details=result.details(),
            )
        )
        values: dict[str, Any] = {
            "last_refresh_at": now,
            "last_refresh_error": None,
            "last_refresh_error_at": None,
            "updated_at": now,
        }
        if result.kind.full:
            values["last_full_refresh_at"] = now
        m = schema.managers
        await conn.execute(update(m).where(m.c.id == manager_id).values(**values))

    async def record_failure(
        self,
        manager: str,
        *,
        kind: RefreshKind,
        targets: int,
        started_at: datetime,
        duration: float,
        error: BaseException,
    ) -> None:
        """Record a failed refresh in ``refresh_runs`` and on the manager (own transaction)."""
        manager_id = self._manager_ids.get(manager)
        if manager_id is None:
            return
        message = f"{type(error).__name__}: {error}"[:4000]
        now = self._now()
        try:
            async with self._write() as conn:
                await conn.execute(
                    insert(schema.refresh_runs).values(
                        manager_id=manager_id,
                        kind=kind.value,
                        targets=targets,
                        created=0,
                        updated=0,
                        archived=0,
                        deleted=0,
                        started_at=started_at,
                        duration=duration,
                        error=message,
                    )
                )
                m = schema.managers
                await conn.execute(
                    update(m)
                    .where(m.c.id == manager_id)
                    .values(last_refresh_error=message, last_refresh_error_at=now, updated_at=now)
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("manager %s: could not record the failed refresh", manager, exc_info=True)

    async def _lock(self, conn: AsyncConnection, manager_id: int) -> None:
        if self._dialect is Dialect.POSTGRESQL:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:ns, :id)"),
                {"ns": ADVISORY_NAMESPACE, "id": manager_id},
            )

    def _write(self) -> _WriteTransaction:
        return _WriteTransaction(
            self._engine, self._sqlite_writer if self._dialect is Dialect.SQLITE else None
        )

    async def row_counts(self, manager: str) -> dict[str, int]:
        """Active rows per collection of ``manager`` (for status and tests)."""
        manager_id = self._manager_id(manager)
        out: dict[str, int] = {}
        async with self._engine.connect() as conn:
            for c in self._collections:
                t = c.table
                q = select(func.count()).select_from(t).where(t.c.manager_id == manager_id)
                if c.retention is Retention.ARCHIVE:
                    q = q.where(t.c.archived_at.is_(None))
                out[c.name] = (await conn.execute(q)).scalar_one()
        return out


class _WriteTransaction:
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


def _removed(collection: Collection, n: int) -> Counts:
    if collection.retention is Retention.ARCHIVE:
        return Counts(archived=n)
    return Counts(deleted=n)


async def _pages(pages: AsyncIterable[InventoryPage]) -> AsyncGenerator[InventoryPage, None]:
    async for page in pages:
        yield page
