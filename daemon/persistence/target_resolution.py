"""Target resolution: targets on child collections made targets on their parents; refs cleaned.

Flow: catcher -> Target -> **target resolution** (child -> parent) -> batcher -> refresher.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from daemon.model.declarations import CollectionRegistry
from daemon.model.targets import Ref, Target, TargetCollection
from daemon.persistence.row_check import clean_ref


class TargetResolver:
    """Maps targets on child collections to their parents, for the collections of one database."""

    def __init__(self, engine: AsyncEngine, collections: CollectionRegistry) -> None:
        self._engine = engine
        self._collections = collections

    def children_targeted(self, targets: TargetCollection) -> set[str]:
        """The child collections ``targets`` name (none: nothing to resolve)."""
        return {
            a
            for a in targets.associations()
            if a in self._collections and self._collections[a].is_child
        }

    async def resolve(
        self, targets: TargetCollection, manager_id: int, children: set[str]
    ) -> TargetCollection:
        """``targets`` with those on ``children`` turned into targets on their parents.

        A child ref that names its parent (``{"vm": ...}``) maps directly; one
        known only by its own ems_ref is looked up.  Unknown child refs are
        kept: a provider may know how to expand them (an AWS volume id).
        """
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


def cleaned_targets(targets: TargetCollection) -> TargetCollection:
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
