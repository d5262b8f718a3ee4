"""The persister: saves parsed inventory for one manager with a scoped deletion.

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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from daemon.model.declarations import Collection, CollectionRegistry, Reference, Retention
from daemon.model.inventory import COLLECTIONS, InventoryPage, Row
from daemon.model.rejection import Rejection, RejectReason
from daemon.model.targets import Ref, Target, TargetCollection, Trigger
from daemon.persistence import schema
from daemon.persistence.db import Dialect, dialect_of
from daemon.persistence.deletion_guard import (
    DeletionGuard,
    HeldDeletion,
    confirm_deletions,
    is_confirmed,
)
from daemon.persistence.diff_statements import diff_statements_for
from daemon.persistence.fencing import verify_fence
from daemon.persistence.refresh_result import Counts, PersisterSettings, RefreshKind, RefreshResult
from daemon.persistence.rejects import RejectLog, protect
from daemon.persistence.row_check import RowChecker, clean_ref, clean_rejection
from daemon.persistence.row_isolation import is_row_error, save_isolating, short_error
from daemon.persistence.small_batch import SmallBatchRefusedError, SmallBatchSaver
from daemon.persistence.staging import TEMP_TABLES_READY, Stager
from daemon.persistence.statements import Statements, statements_for
from daemon.persistence.sweep_scope import SweepScope
from daemon.pipeline.page_batches import FULL_BATCH_ROWS, coalesced

log = logging.getLogger(__name__)

ADVISORY_NAMESPACE = 0x52464844  # "RFHD": first key of pg_advisory_xact_lock(int, int)
ANALYZE_MIN_ROWS = 1000  # rows created in a table by one refresh before it is re-ANALYZEd


UNRECORDED_MAX = 10_000
"""Failed refreshes kept in memory while the database cannot record them."""


@dataclass(frozen=True, slots=True)
class _Failure:
    """A failed refresh, as ``refresh_runs`` records it."""

    manager: str
    manager_id: int
    kind: RefreshKind
    targets: int
    started_at: datetime
    duration: float
    message: str
    at: datetime
    trigger: Trigger


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
        self._checkers = {c.name: RowChecker(c) for c in collections}
        self._rejects = RejectLog(self._dialect)
        self._guard = DeletionGuard(self._settings)
        self._isolating: set[str] = set()  # managers whose full refreshes save row by row
        self._sqlite_writer = asyncio.Lock()
        self._small_batch = SmallBatchSaver(
            engine,
            collections=collections,
            max_targets=self._settings.small_batch_max_targets,
            sqlite_writer=self._sqlite_writer,
        )
        self._unrecorded: deque[_Failure] = deque(maxlen=UNRECORDED_MAX)

    @property
    def collections(self) -> CollectionRegistry:
        return self._collections

    # -- managers ---------------------------------------------------------------

    async def ensure_manager(self, name: str, provider: str) -> int:
        """The id of manager ``name``, creating its row on first use (several processes
        starting together may race to create it: the loser reads the winner's row)."""
        if name in self._manager_ids:
            return self._manager_ids[name]
        try:
            return await self._ensure_manager(name, provider)
        except IntegrityError:
            log.debug("manager %s: created by another process meanwhile", name)
            return await self._ensure_manager(name, provider)

    async def _ensure_manager(self, name: str, provider: str) -> int:
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
                            target.trigger,
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
                .where(
                    c.table.c.manager_id == manager_id,
                    c.table.c.ems_ref == clean_ref(ref["ems_ref"]),
                )
                .limit(1)
            )
        ).first()
        return (c.parent.collection, row.ems_ref) if row else None

    # -- saving -----------------------------------------------------------------

    async def confirm_deletions(self, manager: str) -> None:
        """Let the next full refresh of ``manager`` apply deletions the guard would hold."""
        async with self._write() as conn:
            if not await confirm_deletions(conn, manager, now=self._now()):
                raise LookupError(f"unknown manager {manager!r}")

    async def save(
        self,
        manager: str,
        pages: AsyncIterable[InventoryPage] | Sequence[InventoryPage],
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
        manager_id = self._manager_id(manager)  # raises before anything is recorded
        started = self._now()
        t0 = time.perf_counter()
        if self._small_batch.accepts(kind, targets) and self._rejects.known_clean(manager_id):
            assert targets is not None
            try:
                batch = [page async for page in _each(pages)]  # a targeted refresh's: in memory
                pages = batch
                clean = self._clean_pages(batch)
                if clean is not None:
                    return await self._small_batch.save(
                        manager,
                        clean,
                        manager_id=manager_id,
                        targets=_cleaned_targets(targets),
                        now=started,
                    )
            except SmallBatchRefusedError as exc:
                log.info("manager %s: %s; saving through the staged path", manager, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self.record_failure(
                    manager,
                    kind=kind,
                    trigger=trigger,
                    targets=len(targets),
                    started_at=started,
                    duration=time.perf_counter() - t0,
                    error=exc,
                )
                raise
        isolate = kind.full and manager in self._isolating
        try:
            try:
                result = await self._save_once(
                    manager, pages, targets, kind=kind, isolate=isolate, started=started, t0=t0
                )
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
                result = await self._save_once(
                    manager, pages, targets, kind=kind, isolate=True, started=started, t0=t0
                )
            if kind.full:  # keep isolating while the database refuses rows of this manager
                if any(r.reason is RejectReason.DATABASE_ERROR for r in result.rejected):
                    self._isolating.add(manager)
                else:
                    self._isolating.discard(manager)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.record_failure(
                manager,
                kind=kind,
                trigger=trigger,
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

    async def _save_once(
        self,
        manager: str,
        pages: AsyncIterable[InventoryPage] | Sequence[InventoryPage],
        targets: TargetCollection | None,
        *,
        kind: RefreshKind,
        isolate: bool,
        started: datetime,
        t0: float,
    ) -> RefreshResult:
        manager_id = self._manager_id(manager)
        counts: dict[str, Counts] = {c.name: Counts() for c in self._collections}
        scope = SweepScope(self._collections)
        held: HeldDeletion | None = None
        confirmed = False
        async with self._write() as conn:
            await self._lock(conn, manager_id)
            await verify_fence(conn, manager, manager_id)
            now = self._now()
            params: dict[str, Any] = {"m": manager_id, "now": now}
            stager = Stager(conn, self._engine)
            await stager.prepare(self._statements.values(), self._engine)
            active = await self._count_active(conn, params) if kind.full else {}
            total_before = sum(active.values())
            tracked = self._tracked(kind, targets, active)
            analyzed: dict[str, int] = {}
            saved_refs: dict[str, set[str]] = {}
            # a full refresh saves collector pages merged into larger batches
            batches = (
                coalesced(_each(pages), min_rows=self._full_batch_rows)
                if kind.full
                else _each(pages)
            )
            async with aclosing(batches):
                async for page in batches:
                    saved, rejected = await self._save_page(
                        conn, stager, page, params, tracked, counts, isolate=isolate
                    )
                    scope.observe(saved, covers=page.covers, rejected=rejected)
                    if not kind.full:
                        for name, rows in saved.items():
                            ref_of = self._checkers[name].ref_of
                            saved_refs.setdefault(name, set()).update(ref_of(r) for r in rows)
                    await self._analyze_grown(conn, counts, analyzed)
            if kind.full:
                await protect(
                    conn,
                    scope.protected(),
                    collections=self._collections,
                    statements=self._statements,
                    manager_id=manager_id,
                )
                confirmed = await is_confirmed(conn, manager_id)
                held = await self._sweep_full(
                    conn, manager, params, total_before, tracked, counts, confirmed=confirmed
                )
            else:
                assert targets is not None
                await self._sweep_targeted(conn, targets, params, counts, scope)
            await self._rejects.record(conn, manager, manager_id, scope.rejected, now=now)
            await self._rejects.clear(
                conn, manager_id, now=now, saved=None if kind.full else saved_refs
            )
            result = RefreshResult(
                manager=manager,
                kind=kind,
                targets=len(targets) if targets is not None else 1,
                counts=counts,
                started_at=started,
                duration=time.perf_counter() - t0,
                rejected=scope.rejected,
                held_deletion=held,
                trigger=targets.trigger if targets is not None else Trigger.MANUAL,
            )
            await self._record(conn, manager_id, result, now=now, spend_confirmation=confirmed)
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
        *,
        isolate: bool,
    ) -> tuple[dict[str, list[Row]], list[Rejection]]:
        """Save one page; returns the rows saved per collection and the rejected objects
        (the parser's and the row check's, normalised, and those the database refused)."""
        saved: dict[str, list[Row]] = {}
        rejected: list[Rejection] = [clean_rejection(r) for r in page.rejected]
        for collection in self._collections:
            rows = page.rows.get(collection.name)
            if not rows:
                continue
            checker = self._checkers[collection.name]
            rows, bad = checker.check(rows)
            rejected.extend(bad)
            if collection.parent is not None:  # a rejected vm is kept whole: children too
                rows = _without_children_of(collection.parent, rows, rejected)
            if not rows:
                continue
            st = self._statements[collection.name]
            track = collection.name in tracked
            rows = _dedupe(collection, rows)
            if not isolate:
                delta = await self._save_rows(conn, stager, st, rows, params, track=track)
                parts = [(rows, delta)]
            else:

                def refuse(row: Row, exc: BaseException, checker: RowChecker = checker) -> None:
                    rejected.append(checker.database_rejection(row, short_error(exc)))

                async def save(
                    part: list[Row], st: Statements = st, track: bool = track
                ) -> dict[str, Counts]:
                    return await self._save_rows(conn, stager, st, part, params, track=track)

                parts = await save_isolating(conn, rows, save, reject=refuse)
            for part, delta in parts:
                saved.setdefault(collection.name, []).extend(part)
                for name, c in delta.items():
                    counts[name] = counts[name] + c
        return saved, rejected

    async def _save_rows(
        self,
        conn: AsyncConnection,
        stager: Stager,
        st: Statements,
        rows: list[Row],
        params: dict[str, Any],
        *,
        track: bool,
    ) -> dict[str, Counts]:
        """Stage and upsert checked rows of one collection; returns the counts per collection."""
        delta: dict[str, Counts] = {}
        collection = st.collection
        staged = await stager.load(st, rows)
        for referred, statement in st.skeletal:
            made = len((await conn.execute(statement, params)).all())
            if made:
                delta[referred] = delta.get(referred, Counts()) + Counts(created=made)
        # compare before writing (daemon.persistence.diff_statements): only new and changed rows
        # are written; created: rows inserted now; updated: rows that existed before
        # this refresh (a row created by an earlier page or a skeletal insert is not
        # counted twice)
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
        delta[collection.name] = delta.get(collection.name, Counts()) + Counts(
            created=created, updated=updated
        )
        return delta

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
        *,
        confirmed: bool,
    ) -> HeldDeletion | None:
        """Archive/delete the unseen rows, unless the guard holds the deletion back.
        An untracked collection has nothing to sweep (see ``_tracked``)."""
        would_remove = 0
        for name in tracked:
            would_remove += (
                await conn.execute(self._statements[name].count_full, params)
            ).scalar_one()
        held = self._guard.decide(
            manager, would_remove=would_remove, total=total_before, confirmed=confirmed
        )
        if held is not None:
            return held
        for collection in self._collections:
            if collection.name not in tracked:
                continue
            st = self._statements[collection.name]
            removed = (await conn.execute(st.sweep_full, params)).rowcount
            counts[collection.name] = counts[collection.name] + _removed(collection, removed)
        return None

    async def _sweep_targeted(
        self,
        conn: AsyncConnection,
        targets: TargetCollection,
        params: dict[str, Any],
        counts: dict[str, Counts],
        scope: SweepScope,
    ) -> None:
        for collection in self._collections:
            scope_of = collection.parent.collection if collection.parent else collection.name
            if scope_of in self._collections and self._collections[scope_of].is_child:
                continue
            targeted = {clean_ref(r) for r in targets.references(scope_of)}
            refs = scope.targeted_refs(collection.name, targeted)
            if not refs:
                continue
            st = self._statements[collection.name]
            removed = (await conn.execute(st.sweep_targeted, params | {"refs": refs})).rowcount
            counts[collection.name] = counts[collection.name] + _removed(collection, removed)

    async def _record(
        self,
        conn: AsyncConnection,
        manager_id: int,
        result: RefreshResult,
        *,
        now: datetime,
        spend_confirmation: bool = False,
    ) -> None:
        total = result.total
        await conn.execute(
            insert(schema.refresh_runs).values(
                manager_id=manager_id,
                kind=result.kind.value,
                trigger=result.trigger.value,
                targets=result.targets,
                created=total.created,
                updated=total.updated,
                archived=total.archived,
                deleted=total.deleted,
                started_at=result.started_at,
                duration=result.duration,
                error=None,
                details=result.run_details(),
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
        if spend_confirmation:  # the confirmed deletions were applied: spent
            values["deletions_confirmed_at"] = None
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
        trigger: Trigger = Trigger.EVENT,
    ) -> None:
        """Record a failed refresh in ``refresh_runs`` and on the manager (own transaction).

        When the database cannot take it (it is away: that is often why the refresh
        failed), the record is kept in memory (at most ``UNRECORDED_MAX``, the oldest
        dropped first) and written by :meth:`record_unrecorded` once it answers again.
        """
        manager_id = self._manager_ids.get(manager)
        if manager_id is None:
            return
        failure = _Failure(
            manager=manager,
            manager_id=manager_id,
            kind=kind,
            targets=targets,
            started_at=started_at,
            duration=duration,
            message=f"{type(error).__name__}: {error}"[:4000],
            at=self._now(),
            trigger=trigger,
        )
        try:
            await self._write_failure(failure)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any driver error: keep it for later
            if len(self._unrecorded) == UNRECORDED_MAX:
                log.warning("more than %d unrecorded failures: dropping the oldest", UNRECORDED_MAX)
            self._unrecorded.append(failure)
            log.warning(
                "manager %s: could not record the failed refresh (%s: %s); kept to record"
                " once the database answers",
                manager,
                type(exc).__name__,
                exc,
            )

    async def record_unrecorded(self) -> int:
        """Write the failures :meth:`record_failure` could not; how many were written."""
        written = 0
        while self._unrecorded:
            failure = self._unrecorded[0]
            try:
                await self._write_failure(failure)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - still away: try again later
                log.warning(
                    "still cannot record %d failed refreshes: %s", len(self._unrecorded), exc
                )
                break
            self._unrecorded.popleft()
            written += 1
        if written:
            log.info("recorded %d failed refreshes from while the database was away", written)
        return written

    async def _write_failure(self, failure: _Failure) -> None:
        async with self._write() as conn:
            await conn.execute(
                insert(schema.refresh_runs).values(
                    manager_id=failure.manager_id,
                    kind=failure.kind.value,
                    trigger=failure.trigger.value,
                    targets=failure.targets,
                    created=0,
                    updated=0,
                    archived=0,
                    deleted=0,
                    started_at=failure.started_at,
                    duration=failure.duration,
                    error=failure.message,
                )
            )
            m = schema.managers
            await conn.execute(
                update(m)
                .where(m.c.id == failure.manager_id)
                .where(
                    (m.c.last_refresh_error_at.is_(None))
                    | (m.c.last_refresh_error_at <= failure.at)
                )
                .values(
                    last_refresh_error=failure.message,
                    last_refresh_error_at=failure.at,
                    updated_at=failure.at,
                )
            )

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


async def _each(
    pages: AsyncIterable[InventoryPage] | Sequence[InventoryPage],
) -> AsyncGenerator[InventoryPage, None]:
    if isinstance(pages, Sequence):
        for page in pages:
            yield page
    else:
        async for page in pages:
            yield page


def _without_children_of(
    parent: Reference, rows: list[Row], rejected: list[Rejection]
) -> list[Row]:
    """``rows`` of a child collection, less the children of rejected parents."""
    gone = {r.ref for r in rejected if r.collection == parent.collection}
    if not gone:
        return rows
    return [row for row in rows if row.get(parent.attribute) not in gone]


def _cleaned_targets(targets: TargetCollection) -> TargetCollection:
    """``targets`` with their refs normalised as the rows' keys are (row_check)."""
    return TargetCollection(
        targets.manager,
        [
            Target(
                t.manager,
                t.association,
                Ref({k: clean_ref(v) for k, v in t.manager_ref.items()}),
                t.event_id,
                t.trigger,
            )
            for t in targets
        ],
    )


def _removed(collection: Collection, n: int) -> Counts:
    if collection.retention is Retention.ARCHIVE:
        return Counts(archived=n)
    return Counts(deleted=n)


def _dedupe(collection: Collection, rows: list[Row]) -> list[Row]:
    """One row per conflict key (the last wins): an upsert may touch a row only once."""
    key_attrs = ((collection.parent.attribute,) if collection.parent else ()) + collection.key
    if len(rows) < 2:
        return rows
    by_key: dict[tuple[Any, ...], Row] = {}
    for row in rows:
        by_key[tuple(row.get(a) for a in key_attrs)] = row
    return list(by_key.values()) if len(by_key) != len(rows) else rows
