"""The staged saver: a refresh's transaction and its page loop (stage, upsert, sweep, record).

Flow: persister -> **staged saver** (pages -> staging -> upserts) -> sweeper -> ``refresh_runs``.

One transaction per refresh, under the manager's lock (:mod:`daemon.persistence.dialect`)
and committed only under the epoch the refresh began with (``verify_fence``).  A full
refresh streams: the collector's pages, merged into save batches
(:mod:`daemon.pipeline.page_batches`), are staged (:mod:`daemon.persistence.staging`)
and saved as they arrive; only the ids of seen rows accumulate, in the database.  Only
new and changed rows are written (:mod:`daemon.persistence.diff_statements`).  Rows are
checked first (:mod:`daemon.persistence.row_check`); when ``isolate`` is set, rows the
database refuses are isolated (:mod:`daemon.persistence.row_isolation`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Sequence
from contextlib import aclosing
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from daemon.model.declarations import Collection, CollectionRegistry, Reference
from daemon.model.inventory import InventoryPage, Row
from daemon.model.rejection import Rejection
from daemon.model.targets import TargetCollection, Trigger
from daemon.persistence.db import Dialect
from daemon.persistence.deletion_guard import HeldDeletion, is_confirmed
from daemon.persistence.dialect import Writer, analyze_grown, lock_manager
from daemon.persistence.diff_statements import diff_statements_for
from daemon.persistence.fencing import verify_fence
from daemon.persistence.refresh_result import Counts, RefreshKind, RefreshResult
from daemon.persistence.rejects import RejectLog, protect
from daemon.persistence.row_check import RowChecker, clean_rejection
from daemon.persistence.row_isolation import save_isolating, short_error
from daemon.persistence.runs import record_run
from daemon.persistence.staging import Stager
from daemon.persistence.statements import Statements
from daemon.persistence.sweep_scope import SweepScope
from daemon.persistence.sweeper import Sweeper
from daemon.pipeline.page_batches import coalesced

Pages = AsyncIterable[InventoryPage] | Sequence[InventoryPage]


class StagedSaver:
    """Saves a refresh's pages through temp tables in one transaction (see the module docstring)."""

    def __init__(
        self,
        writer: Writer,
        *,
        collections: CollectionRegistry,
        statements: dict[str, Statements],
        checkers: dict[str, RowChecker],
        sweeper: Sweeper,
        rejects: RejectLog,
        now: Callable[[], datetime],
        full_batch_rows: int,
    ) -> None:
        self._writer = writer
        self._engine = writer.engine
        self._dialect = writer.dialect
        self._collections = collections
        self._statements = statements
        self._checkers = checkers
        self._sweeper = sweeper
        self._rejects = rejects
        self._now = now
        self._full_batch_rows = full_batch_rows

    async def save(
        self,
        manager: str,
        manager_id: int,
        pages: Pages,
        targets: TargetCollection | None,
        *,
        kind: RefreshKind,
        isolate: bool,
        started: datetime,
        t0: float,
    ) -> RefreshResult:
        """Save ``pages`` in one transaction, sweep and record the refresh; its result."""
        counts: dict[str, Counts] = {c.name: Counts() for c in self._collections}
        scope = SweepScope(self._collections)
        held: HeldDeletion | None = None
        confirmed = False
        async with self._writer.begin() as conn:
            await lock_manager(conn, self._dialect, manager_id)
            await verify_fence(conn, manager, manager_id)
            now = self._now()
            params: dict[str, Any] = {"m": manager_id, "now": now}
            stager = Stager(conn, self._engine)
            await stager.prepare(self._statements.values(), self._engine)
            active = await self._sweeper.count_active(conn, params) if kind.full else {}
            total_before = sum(active.values())
            tracked = self._sweeper.tracked(kind, targets, active)
            analyzed: dict[str, int] = {}
            saved_refs: dict[str, set[str]] = {}
            # a full refresh saves collector pages merged into larger batches
            batches = (
                coalesced(each(pages), min_rows=self._full_batch_rows) if kind.full else each(pages)
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
                    await analyze_grown(conn, self._dialect, self._collections, counts, analyzed)
            if kind.full:
                await protect(
                    conn,
                    scope.protected(),
                    collections=self._collections,
                    statements=self._statements,
                    manager_id=manager_id,
                )
                confirmed = await is_confirmed(conn, manager_id)
                held = await self._sweeper.sweep_full(
                    conn, manager, params, total_before, tracked, counts, confirmed=confirmed
                )
            else:
                assert targets is not None
                await self._sweeper.sweep_targeted(conn, targets, params, counts, scope)
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
            await record_run(conn, manager_id, result, now=now, spend_confirmation=confirmed)
        return result

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


async def each(pages: Pages) -> AsyncGenerator[InventoryPage, None]:
    """The pages of a sequence or an async stream, as a stream."""
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


def _dedupe(collection: Collection, rows: list[Row]) -> list[Row]:
    """One row per conflict key (the last wins): an upsert may touch a row only once."""
    key_attrs = collection.conflict_attributes
    if len(rows) < 2:
        return rows
    by_key: dict[tuple[Any, ...], Row] = {}
    for row in rows:
        by_key[tuple(row.get(a) for a in key_attrs)] = row
    return list(by_key.values()) if len(by_key) != len(rows) else rows
