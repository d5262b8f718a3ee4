"""The sweeps of a refresh: collections tracked, unseen rows archived/deleted, the deletion guard.

Flow: persister -> saver (pages saved) -> **sweeper** (guard: sweep applied or held) -> tables.

Scope FULL: every row of the manager is in scope; rows not seen are archived
(top level) or deleted (children), unless the mass-deletion guard holds the
deletion back (:mod:`daemon.persistence.deletion_guard`).  Scope TARGETED: a
targeted top-level collection's scope is exactly the targeted refs, a child
collection's scope the children of targeted parents (less what
:mod:`daemon.persistence.sweep_scope` spares); collections that were only
referred to are upserted, never swept.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from daemon.model.declarations import Collection, CollectionRegistry, Retention
from daemon.model.targets import TargetCollection
from daemon.persistence.deletion_guard import DeletionGuard, HeldDeletion
from daemon.persistence.refresh_result import Counts, RefreshKind
from daemon.persistence.row_check import clean_ref
from daemon.persistence.statements import Statements
from daemon.persistence.sweep_scope import SweepScope


def removed_counts(collection: Collection, n: int) -> Counts:
    """``n`` rows of ``collection`` swept: archived or deleted, as it keeps them."""
    if collection.retention is Retention.ARCHIVE:
        return Counts(archived=n)
    return Counts(deleted=n)


class Sweeper:
    """Sweeps the rows a refresh did not see, for the collections of one database."""

    def __init__(
        self,
        collections: CollectionRegistry,
        statements: dict[str, Statements],
        guard: DeletionGuard,
    ) -> None:
        self._collections = collections
        self._statements = statements
        self._guard = guard

    async def count_active(self, conn: AsyncConnection, params: dict[str, Any]) -> dict[str, int]:
        """Active rows of the manager per collection, before a full refresh."""
        return {
            name: (await conn.execute(st.count_active, params)).scalar_one()
            for name, st in self._statements.items()
        }

    def tracked(
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

    async def sweep_full(
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
        An untracked collection has nothing to sweep (see :meth:`tracked`)."""
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
            counts[collection.name] = counts[collection.name] + removed_counts(collection, removed)
        return None

    async def sweep_targeted(
        self,
        conn: AsyncConnection,
        targets: TargetCollection,
        params: dict[str, Any],
        counts: dict[str, Counts],
        scope: SweepScope,
    ) -> None:
        """Archive/delete the rows in the targets' scope that the refresh did not save."""
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
            counts[collection.name] = counts[collection.name] + removed_counts(collection, removed)
