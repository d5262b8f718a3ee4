"""Targets: what an event asks to refresh.

Flow: event -> **Target** -> batch (TargetCollection) -> collector -> parser -> persister.

A :class:`Target` names one object of one manager by its collection (the
*association*) and its ``manager_ref`` (the key the cloud uses, usually
``{"ems_ref": ...}``).  A Target whose association is :data:`MANAGER` means
"refresh the whole manager".  A :class:`TargetCollection` holds the
deduplicated targets of one manager that are refreshed together; it is the
scope of a targeted refresh.  Each Target carries its :class:`Trigger` (why it
was asked for), recorded in ``refresh_runs.trigger``; it never takes part in
deduplication.

Operators name targets as ``COLLECTION:REF`` (``vms:vm-12``, ``disks:vm=vm-12,device_name=sda``);
:func:`parse_target` is the one parser of that form (``refreshd refresh --target`` and
``POST /refresh``), and refuses a collection that is not declared.

Every event builds at least one Target, so the common case (one ``ems_ref``)
is built without sorting, and hashing and comparing refs stays cheap.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.model.declarations import CollectionRegistry

MANAGER = "manager"
"""The association of a target that means a full refresh of its manager."""


class Trigger(enum.Enum):
    """Why a refresh runs (``refresh_runs.trigger``)."""

    SCHEDULED = "scheduled"
    """The periodic full refresh (``refresh_interval``)."""
    STARTUP = "startup"
    """The full refresh at start of a manager never refreshed, or overdue."""
    EVENT = "event"
    """Events from a catcher."""
    MANUAL = "manual"
    """An operator: ``POST /refresh`` or ``refreshd refresh``."""
    ESCALATED = "escalated"
    """The batcher turned targets into a full refresh (too many, or failing retries)."""


class Ref(Mapping[str, str]):
    """An immutable, hashable ``manager_ref`` mapping (e.g. ``{"ems_ref": "vm-12"}``)."""

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self._items: tuple[tuple[str, str], ...] = tuple(sorted((str(k), str(v)) for k, v in pairs))
        self._hash = hash(self._items)

    @classmethod
    def single(cls, key: str, value: str) -> Ref:
        """``Ref({key: value})``, without the general constructor's sorting."""
        ref = cls.__new__(cls)
        ref._items = ((str(key), value if type(value) is str else str(value)),)
        ref._hash = hash(ref._items)
        return ref

    def __getitem__(self, key: str) -> str:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if type(other) is Ref or isinstance(other, Ref):  # the first test skips the ABC machinery
            return self._items == other._items
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Ref({dict(self._items)!r})"


@dataclass(frozen=True, slots=True)
class Target:
    """One thing to refresh: ``(manager, association, manager_ref)``."""

    manager: str
    association: str
    manager_ref: Ref = field(default_factory=Ref)
    event_id: str | None = field(default=None, compare=False)
    trigger: Trigger = field(default=Trigger.EVENT, compare=False)

    def __post_init__(self) -> None:
        ref = self.manager_ref
        if type(ref) is not Ref and not isinstance(ref, Ref):
            object.__setattr__(self, "manager_ref", Ref(self.manager_ref))

    @classmethod
    def full(
        cls, manager: str, *, event_id: str | None = None, trigger: Trigger = Trigger.EVENT
    ) -> Target:
        """A target meaning: refresh every collection of ``manager``."""
        return cls(manager, MANAGER, Ref(), event_id, trigger)

    @classmethod
    def of(
        cls,
        manager: str,
        association: str,
        ems_ref: str,
        *,
        event_id: str | None = None,
        trigger: Trigger = Trigger.EVENT,
    ) -> Target:
        """The common case: an object identified by its ``ems_ref``."""
        return cls(manager, association, Ref.single("ems_ref", ems_ref), event_id, trigger)

    @property
    def is_full(self) -> bool:
        return self.association == MANAGER

    @property
    def key(self) -> tuple[str, Ref]:
        """The deduplication key within one manager."""
        return (self.association, self.manager_ref)

    def __str__(self) -> str:
        if self.is_full:
            return f"{self.manager}:full"
        ref = ",".join(f"{v}" for v in self.manager_ref.values())
        return f"{self.manager}:{self.association}:{ref}"


class TargetCollection:
    """The deduplicated targets of one manager, refreshed together.

    Deduplication is by ``(association, manager_ref)``; the first target added
    for a key is kept.  The collection means a full refresh when it holds a
    manager target.
    """

    __slots__ = ("_targets", "manager")

    def __init__(self, manager: str, targets: Iterable[Target] = ()) -> None:
        self.manager = manager
        self._targets: dict[tuple[str, Ref], Target] = {}
        for target in targets:
            self.add_target(target)

    def add_target(self, target: Target) -> bool:
        """Add ``target``; returns False when an equal target was already there."""
        if target.manager != self.manager:
            raise ValueError(
                f"target {target} belongs to manager {target.manager!r}, not {self.manager!r}"
            )
        key = (target.association, target.manager_ref)
        if key in self._targets:
            return False
        self._targets[key] = target
        return True

    def take_first(self, count: int) -> list[Target]:
        """Remove and return the ``count`` targets added first (all when fewer)."""
        keys = list(itertools.islice(self._targets, count))
        return [self._targets.pop(key) for key in keys]

    def merge(self, other: TargetCollection) -> None:
        for target in other:
            self.add_target(target)

    def __iter__(self) -> Iterator[Target]:
        return iter(self._targets.values())

    def __len__(self) -> int:
        return len(self._targets)

    def __contains__(self, target: object) -> bool:
        return isinstance(target, Target) and target.key in self._targets

    def __bool__(self) -> bool:
        return bool(self._targets)

    @property
    def is_full(self) -> bool:
        """True when the collection asks for a full refresh of its manager."""
        return (MANAGER, Ref()) in self._targets

    @property
    def trigger(self) -> Trigger:
        """Why this refresh runs: a full one's manager target says; a targeted one is
        manual when an operator asked for any of its targets, else from events."""
        full = self._targets.get((MANAGER, Ref()))
        if full is not None:
            return full.trigger
        if any(t.trigger is Trigger.MANUAL for t in self._targets.values()):
            return Trigger.MANUAL
        return Trigger.EVENT

    def references(self, association: str, attribute: str = "ems_ref") -> set[str]:
        """The values of ``attribute`` of the refs targeted in ``association``."""
        return {
            ref[attribute]
            for (assoc, ref) in self._targets
            if assoc == association and attribute in ref
        }

    def manager_refs_by_association(self) -> dict[str, list[Ref]]:
        result: dict[str, list[Ref]] = {}
        for assoc, ref in self._targets:
            if assoc != MANAGER:
                result.setdefault(assoc, []).append(ref)
        return result

    def associations(self) -> set[str]:
        return {assoc for assoc, _ in self._targets if assoc != MANAGER}

    def describe(self) -> dict[str, Any]:
        """A short, loggable summary: counts per association."""
        return {k: len(v) for k, v in self.manager_refs_by_association().items()} | (
            {"full": True} if self.is_full else {}
        )

    def __repr__(self) -> str:
        return f"TargetCollection({self.manager!r}, {self.describe()!r})"


class TargetSpecError(ValueError):
    """A ``COLLECTION:REF`` an operator gave cannot name a target; the message says why."""


def parse_target(manager: str, spec: str, collections: CollectionRegistry) -> Target:
    """``vms:vm-12`` or ``disks:vm=vm-12,device_name=sda`` -> a manual Target of ``manager``;
    the collection must be one of ``collections`` (the declared ones,
    ``daemon.model.inventory.COLLECTIONS``)."""
    collection, sep, ref = spec.partition(":")
    if not sep or not collection or not ref:
        raise TargetSpecError(f"{spec!r}: expected COLLECTION:REF, e.g. vms:vm-000012")
    if collection not in collections:
        known = ", ".join(collections.save_order)
        raise TargetSpecError(f"{spec!r}: unknown collection {collection!r} ({known})")
    if "=" in ref:
        pairs = [p.partition("=") for p in ref.split(",")]
        if any(not k or not v for k, _, v in pairs):
            raise TargetSpecError(f"{spec!r}: expected key=value pairs after ':'")
        return Target(manager, collection, Ref({k: v for k, _, v in pairs}), trigger=Trigger.MANUAL)
    return Target.of(manager, collection, ref, trigger=Trigger.MANUAL)
