"""Collection declarations, and what is derived from them.

Flow: event -> Target -> batch -> collector -> parser -> **collection** -> persister.

Each kind of inventory object is declared once as a :class:`Collection`: its
name (the *association* targets use), its table, the attributes that identify
a row (``key``), its parent (children such as disks belong to a vm), its
retention, and the attributes that refer to other collections.  From these the
:class:`CollectionRegistry` derives the save order (references and parents
first) and the scope of a targeted refresh; providers never write scope code.

Rows handed to the persister are plain dicts keyed by attribute name.  A
reference or parent attribute holds the *ems_ref* of the object it points to
(``{"ems_ref": "vm-1", "flavor": "m1.small"}``); the persister resolves it to
the foreign key column (``flavor_id``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from sqlalchemy import Table


class Retention(enum.Enum):
    """What a refresh does with a row in scope that the cloud no longer returns."""

    ARCHIVE = "archive"  # set archived_at, keep the row (history; same id if it comes back)
    DESTROY = "destroy"  # delete the row


@dataclass(frozen=True, slots=True)
class Reference:
    """Attribute ``attribute`` holds the ems_ref of a row of ``collection``,
    stored as the foreign key ``column``."""

    attribute: str
    collection: str
    column: str


@dataclass(frozen=True, slots=True)
class Collection:
    """The declaration of one collection."""

    name: str
    table: Table
    key: tuple[str, ...]
    """Attributes that identify a row within its manager (top-level) or parent (child).
    A key attribute may be a reference (``vm_security_groups`` is keyed by its group)."""
    values: tuple[str, ...] = ()
    """Plain attributes copied to same-named columns."""
    retention: Retention = Retention.ARCHIVE
    parent: Reference | None = None
    references: tuple[Reference, ...] = ()

    @property
    def is_child(self) -> bool:
        return self.parent is not None

    def reference(self, attribute: str) -> Reference | None:
        for ref in self.references:
            if ref.attribute == attribute:
                return ref
        return None

    @property
    def all_references(self) -> tuple[Reference, ...]:
        return ((self.parent,) if self.parent else ()) + self.references

    def column_of(self, attribute: str) -> str:
        """The table column that stores ``attribute`` (resolved for references)."""
        for ref in self.all_references:
            if ref.attribute == attribute:
                return ref.column
        return attribute

    @property
    def conflict_columns(self) -> tuple[str, ...]:
        """The unique key the upsert conflicts on."""
        scope = (self.parent.column,) if self.parent else ("manager_id",)
        return scope + tuple(self.column_of(a) for a in self.key)

    @property
    def conflict_attributes(self) -> tuple[str, ...]:
        """The attributes that identify a row (parent, then key): ``conflict_columns``'."""
        return ((self.parent.attribute,) if self.parent else ()) + self.key

    @property
    def staged_attributes(self) -> tuple[str, ...]:
        """Every attribute a parsed row carries, in a fixed order."""
        seen: dict[str, None] = {}
        for attr in (
            *(r.attribute for r in self.all_references),
            *self.key,
            *self.values,
        ):
            seen.setdefault(attr)
        return tuple(seen)

    @property
    def updatable_columns(self) -> tuple[str, ...]:
        """Columns an upsert may change (everything but the conflict key)."""
        key_cols = set(self.conflict_columns)
        cols = [r.column for r in self.references] + list(self.values)
        return tuple(c for c in cols if c not in key_cols)


class CollectionError(ValueError):
    """A declaration that cannot work (unknown collection, cycle, bad key)."""


@dataclass(frozen=True, slots=True)
class CollectionRegistry:
    """All declared collections, with the save order and scope rules derived from them."""

    collections: Mapping[str, Collection]
    save_order: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        for c in self.collections.values():
            for ref in c.all_references:
                target = self.collections.get(ref.collection)
                if target is None:
                    raise CollectionError(
                        f"{c.name}.{ref.attribute} refers to unknown collection {ref.collection!r}"
                    )
                if target.is_child or target.key != ("ems_ref",):
                    raise CollectionError(
                        f"{c.name}.{ref.attribute}: only top-level collections keyed by "
                        f"ems_ref can be referred to, not {ref.collection!r}"
                    )
            if c.is_child and c.retention is not Retention.DESTROY:
                raise CollectionError(f"child collection {c.name!r} must have DESTROY retention")
        object.__setattr__(self, "save_order", self._topological_order())

    @classmethod
    def of(cls, collections: Iterable[Collection]) -> CollectionRegistry:
        return cls({c.name: c for c in collections})

    def _topological_order(self) -> tuple[str, ...]:
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(name: str, path: tuple[str, ...]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                raise CollectionError("reference cycle: " + " -> ".join((*path, name)))
            state[name] = 1
            for ref in self.collections[name].all_references:
                if ref.collection != name:
                    visit(ref.collection, (*path, name))
            state[name] = 2
            order.append(name)

        for name in sorted(self.collections):
            visit(name, ())
        return tuple(order)

    def __getitem__(self, name: str) -> Collection:
        try:
            return self.collections[name]
        except KeyError:
            raise CollectionError(
                f"unknown collection {name!r}; known: {', '.join(sorted(self.collections))}"
            ) from None

    def __iter__(self) -> Iterator[Collection]:
        """Collections in save order (references and parents first)."""
        return (self.collections[n] for n in self.save_order)

    def __contains__(self, name: object) -> bool:
        return name in self.collections

    def top_level(self) -> list[Collection]:
        return [c for c in self if not c.is_child]

    def children_of(self, name: str) -> list[Collection]:
        return [c for c in self if c.parent is not None and c.parent.collection == name]
