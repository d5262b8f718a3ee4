"""What a refresh may sweep, given what its pages covered and what it rejected.

Flow: collector -> parser -> persister (pages saved) -> **sweep scope** -> sweep.

The persister feeds every saved page to a :class:`SweepScope`; before sweeping
it asks which rows are off limits:

* a rejected object is not gone: its row stays (a rejected vm keeps its
  children too), and a rejected child keeps its siblings of the same
  collection (the vm's list of them was not saved completely);
* in a targeted refresh, a child collection is swept only for the parents
  whose page declared it covered (``InventoryPage.covers``); a targeted
  parent the cloud no longer has is gone with all its children.

Targeted refreshes get the refs to sweep (:meth:`SweepScope.targeted_refs`);
full refreshes, which sweep by "not seen", get the rows to mark seen
(:meth:`SweepScope.protected`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from daemon.model.declarations import CollectionRegistry
from daemon.model.inventory import Row
from daemon.model.rejection import Rejection


@dataclass(frozen=True, slots=True)
class Protected:
    """Rows a full refresh must not sweep: top-level refs, and parents whose children stay."""

    rows: dict[str, set[str]]
    """collection -> ems_refs of its rows to keep."""
    children: dict[str, set[str]]
    """child collection -> ems_refs of the parents whose children of it to keep."""

    def __bool__(self) -> bool:
        return any(self.rows.values()) or any(self.children.values())


@dataclass(slots=True)
class SweepScope:
    """Accumulates, page by page, what the sweep must spare."""

    collections: CollectionRegistry
    rejected: list[Rejection] = field(default_factory=list)
    _returned: dict[str, set[str]] = field(default_factory=dict)
    _covered: dict[str, set[str]] = field(default_factory=dict)

    def observe(
        self,
        saved: Mapping[str, list[Row]],
        *,
        covers: frozenset[str],
        rejected: Iterable[Rejection],
    ) -> None:
        """Record the rows of one page that were saved (normalised), the child collections
        the page covered, and the objects rejected from it."""
        self.rejected.extend(rejected)
        for collection, rows in saved.items():
            children = self.collections.children_of(collection)
            if not children or self.collections[collection].is_child:
                continue
            refs = _refs(rows)
            self._returned.setdefault(collection, set()).update(refs)
            for child in children:
                if child.name in covers:
                    self._covered.setdefault(child.name, set()).update(refs)

    def targeted_refs(self, collection: str, refs: Iterable[str]) -> list[str]:
        """Of the targeted ``refs`` (of the collection or, for a child, of its parents),
        those whose rows (children) the sweep may remove."""
        c = self.collections[collection]
        refs = set(refs)
        if c.parent is None:
            refs -= {r.ref for r in self.rejected if r.collection == collection}
            return sorted(refs)
        parent = c.parent.collection
        rejected_parents = {r.ref for r in self.rejected if r.collection == parent}
        rejected_here = {r.parent for r in self.rejected if r.collection == collection}
        returned = self._returned.get(parent, set())
        covered = self._covered.get(collection, set())
        keep = rejected_parents | rejected_here | (returned - covered)
        return sorted(refs - keep)

    def protected(self) -> Protected:
        """What a full refresh keeps although it did not see it."""
        rows: dict[str, set[str]] = {}
        children: dict[str, set[str]] = {}
        for r in self.rejected:
            if r.collection not in self.collections:
                continue
            c = self.collections[r.collection]
            if c.parent is None:
                rows.setdefault(c.name, set()).add(r.ref)
                for child in self.collections.children_of(c.name):
                    children.setdefault(child.name, set()).add(r.ref)
            elif r.parent is not None:
                children.setdefault(c.name, set()).add(r.parent)
        return Protected(rows, children)


def _refs(rows: Iterable[Row]) -> set[str]:
    return {ref for row in rows if isinstance(ref := row.get("ems_ref"), str)}
