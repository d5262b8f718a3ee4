"""The AwesomeCloud simulator's in-memory cloud: objects, mutations and their events.

Flow: **simulator.cloud** (this module) -> simulator.app (HTTP) -> client -> collector -> parser.
The cloud is also the *source* of the event stream: every mutation appends
a CloudEvents 1.0 event that catchers turn into Targets.

Guarantees:

- ``Cloud.generate(vms=..., seed=...)`` is deterministic: the same arguments give
  the same objects (ids, names, references, timestamps) on every run.
- Listing is keyset-paged in id order: an object that exists for the whole of
  a listing is returned exactly once, whatever mutations happen meanwhile.
- Every mutation (``create`` / ``update`` / ``delete``, and ``churn``, which
  only uses those three) appends exactly one event with the next ``sequence``
  number and hands it, in order, to every subscriber before returning.
- Stored objects are replaced, never mutated in place, so an object returned
  by a read or carried by an event stays as it was.  Treat them as read-only.
"""

from __future__ import annotations

import bisect
import gc
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from random import Random

from providers.awesome_cloud.simulator import model
from providers.awesome_cloud.simulator.churn import apply_random_mutation
from providers.awesome_cloud.simulator.model import (
    COLLECTIONS,
    SINGULAR,
    ApiObject,
    BadRequestError,
    CloudEvent,
    ConflictError,
    NotFoundError,
    SimulatorError,
)

__all__ = [
    "COLLECTIONS",
    "ApiObject",
    "BadRequestError",
    "Cloud",
    "CloudEvent",
    "ConflictError",
    "EventsPage",
    "NotFoundError",
    "SimulatorError",
]

log = logging.getLogger(__name__)

EventCallback = Callable[[CloudEvent], None]
Clock = Callable[[], datetime]

DEFAULT_MAX_EVENTS = 100_000


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class EventsPage:
    """A slice of the event log after some sequence number."""

    events: list[CloudEvent]
    last: int
    """The cursor to pass as ``after`` next time (sequence of the last event returned)."""
    latest: int
    """The highest sequence number in the log (0 when nothing ever happened)."""
    truncated: bool
    """True when events after the requested position had already left the window."""


class Cloud:
    """A deterministic in-memory cloud: flavors, images, security groups and vms."""

    def __init__(
        self,
        *,
        name: str = "awesome",
        clock: Clock = _utcnow,
        max_events: int = DEFAULT_MAX_EVENTS,
        instance_id: str | None = None,
    ) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.name = name
        self._clock = clock
        self._max_events = max_events
        self._instance = instance_id or secrets.token_hex(4)
        self._objects: dict[str, dict[str, ApiObject]] = {c: {} for c in COLLECTIONS}
        self._sorted_ids: dict[str, list[str]] = {c: [] for c in COLLECTIONS}
        self._counters: dict[str, int] = dict.fromkeys(COLLECTIONS, 0)
        self._port_counter = 0
        self._events: list[CloudEvent] = []
        self._first_sequence = 1
        self._next_sequence = 1
        self._subscribers: list[EventCallback] = []

    # -- building -------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        *,
        vms: int,
        seed: int,
        name: str = "awesome",
        clock: Clock = _utcnow,
        max_events: int = DEFAULT_MAX_EVENTS,
        instance_id: str | None = None,
    ) -> Cloud:
        """A cloud of ``vms`` vms (and ~vms/50+5 images, 8 flavors, ~vms/100+5 groups).

        Seeding produces no events: it is the state the cloud starts in.  The
        objects built are moved out of the cyclic GC's sight (``gc.freeze``).
        """
        if vms < 0:
            raise ValueError("vms must be >= 0")
        cloud = cls(name=name, clock=clock, max_events=max_events, instance_id=instance_id)
        with _outside_gc():
            cloud._populate(Random(seed), vms)
        return cloud

    def _populate(self, rng: Random, vms: int) -> None:
        for fields in model.seed_flavors():
            self._insert("flavors", self._next_id("flavors"), fields)
        for _ in range(vms // 50 + 5):
            self._insert("images", self._next_id("images"), model.random_image(rng))
        for _ in range(vms // 100 + 5):
            self._insert(
                "security_groups",
                self._next_id("security_groups"),
                model.random_security_group(rng),
            )
        choices = model.VmChoices(
            flavors=self._sorted_ids["flavors"],
            images=self._sorted_ids["images"],
            security_groups=self._sorted_ids["security_groups"],
        )
        for _ in range(vms):
            vm_id = self._next_id("vms")
            fields = model.random_vm(rng, choices, self._new_ports(1 + (rng.random() < 0.3)))
            self._insert("vms", vm_id, fields)

    def _next_id(self, collection: str) -> str:
        prefix, width = model.ID_FORMAT[collection]
        while True:
            self._counters[collection] += 1
            candidate = f"{prefix}-{self._counters[collection]:0{width}d}"
            if candidate not in self._objects[collection]:
                return candidate

    def _new_ports(self, count: int) -> list[ApiObject]:
        ports = []
        for _ in range(count):
            self._port_counter += 1
            ports.append(model.port_for(self._port_counter))
        return ports

    def _insert(self, collection: str, obj_id: str, fields: ApiObject) -> ApiObject:
        obj = {"id": obj_id, **fields}
        self._objects[collection][obj_id] = obj
        ids = self._sorted_ids[collection]
        if not ids or ids[-1] < obj_id:
            ids.append(obj_id)
        else:
            bisect.insort(ids, obj_id)
        return obj

    # -- reading --------------------------------------------------------------------

    def count(self, collection: str) -> int:
        return len(self._objects[_known(collection)])

    def ids(self, collection: str) -> list[str]:
        """Every id of ``collection``, in listing order."""
        return list(self._sorted_ids[_known(collection)])

    def random_id(self, collection: str, rng: Random) -> str | None:
        """A uniformly drawn id of ``collection`` (None when it is empty)."""
        ids = self._sorted_ids[_known(collection)]
        return ids[int(rng.random() * len(ids))] if ids else None

    def get(self, collection: str, obj_id: str) -> ApiObject | None:
        """The object (read-only), or None."""
        return self._objects[_known(collection)].get(obj_id)

    def list_page(
        self, collection: str, *, limit: int, page_token: str | None = None
    ) -> tuple[list[ApiObject], str | None]:
        """Up to ``limit`` objects after ``page_token``, and the token of the next page."""
        if limit < 1:
            raise BadRequestError("limit must be >= 1")
        ids = self._sorted_ids[_known(collection)]
        start = bisect.bisect_right(ids, page_token) if page_token else 0
        chunk = ids[start : start + limit]
        objects = self._objects[collection]
        next_token = chunk[-1] if chunk and start + limit < len(ids) else None
        return [objects[i] for i in chunk], next_token

    def get_many(self, collection: str, ids: Iterable[str]) -> list[ApiObject]:
        """The objects with these ids, in id order; unknown ids are omitted."""
        objects = self._objects[_known(collection)]
        return [objects[i] for i in sorted(set(ids)) if i in objects]

    def snapshot(self) -> dict[str, dict[str, ApiObject]]:
        """Every object by collection and id (for comparisons in tests and demos)."""
        return {c: dict(objs) for c, objs in self._objects.items()}

    # -- mutating -------------------------------------------------------------------

    def create(self, collection: str, fields: ApiObject) -> ApiObject:
        """Create an object (``fields`` may carry its ``id``); emits ``<x>.created``."""
        collection = _known(collection)
        fields = dict(fields)
        obj_id = fields.pop("id", None)
        if obj_id is None:
            obj_id = self._next_id(collection)
        elif not isinstance(obj_id, str) or not obj_id or "," in obj_id:
            raise BadRequestError("id must be a non-empty string without commas")
        elif obj_id in self._objects[collection]:
            raise ConflictError(f"{SINGULAR[collection]} {obj_id!r} already exists")
        values = model.validate(collection, fields)
        values = {
            **model.defaults(collection, obj_id, self._clock()),
            **self._with_port_ids(values),
        }
        obj = self._insert(collection, obj_id, values)
        self._emit(collection, "created", obj_id, obj)
        return obj

    def update(self, collection: str, obj_id: str, fields: ApiObject) -> ApiObject:
        """Merge ``fields`` into the object (lists and tags are replaced); emits ``updated``."""
        collection = _known(collection)
        old = self._objects[collection].get(obj_id)
        if old is None:
            raise NotFoundError(f"{SINGULAR[collection]} {obj_id!r} not found")
        fields = dict(fields)
        if fields.pop("id", obj_id) != obj_id:
            raise BadRequestError("id cannot be changed")
        values = self._with_port_ids(model.validate(collection, fields))
        obj = {**old, **values}
        self._objects[collection][obj_id] = obj
        self._emit(collection, "updated", obj_id, obj)
        return obj

    def delete(self, collection: str, obj_id: str) -> ApiObject:
        """Delete the object; emits ``<x>.deleted`` whose data is ``{"id": ...}``."""
        collection = _known(collection)
        obj = self._objects[collection].pop(obj_id, None)
        if obj is None:
            raise NotFoundError(f"{SINGULAR[collection]} {obj_id!r} not found")
        ids = self._sorted_ids[collection]
        del ids[bisect.bisect_left(ids, obj_id)]
        self._emit(collection, "deleted", obj_id, {"id": obj_id})
        return obj

    def _with_port_ids(self, values: ApiObject) -> ApiObject:
        ports = values.get("ports")
        if ports and any("id" not in p for p in ports):
            values["ports"] = [p if "id" in p else {**self._new_ports(1)[0], **p} for p in ports]
        return values

    def churn(self, rng: Random, n: int) -> list[CloudEvent]:
        """Apply ``n`` random realistic mutations; returns the events they produced."""
        first = self._next_sequence
        for _ in range(n):
            apply_random_mutation(self, rng)
        return self._events[max(0, first - self._first_sequence) :]

    # -- events ---------------------------------------------------------------------

    def subscribe(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback(event)`` synchronously for every event appended from now on.

        Callbacks run inside the mutation, in order; one that raises is logged and
        does not stop the mutation or the other subscribers.  An async consumer
        should only enqueue (``queue.put_nowait``).  Returns an unsubscribe function.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    @property
    def last_sequence(self) -> int:
        """The sequence number of the newest event (0 when there was none)."""
        return self._next_sequence - 1

    def events_after(self, after: int, *, limit: int = 1000) -> EventsPage:
        """Events with ``sequence > after``, oldest first, at most ``limit``."""
        if limit < 1:
            raise BadRequestError("limit must be >= 1")
        latest = self.last_sequence
        truncated = after + 1 < self._first_sequence
        start = max(0, after + 1 - self._first_sequence)
        events = self._events[start : start + limit]
        last = events[-1]["sequence"] if events else min(max(after, 0), latest)
        return EventsPage(events=events, last=last, latest=latest, truncated=truncated)

    def _emit(self, collection: str, action: str, subject: str, data: ApiObject) -> None:
        sequence = self._next_sequence
        self._next_sequence += 1
        event: CloudEvent = {
            "specversion": "1.0",
            "id": f"{self._instance}-{sequence:010d}",
            "source": self.name,
            "type": f"com.awesomecloud.{SINGULAR[collection]}.{action}",
            "subject": subject,
            "time": _rfc3339(self._clock()),
            "datacontenttype": "application/json",
            "sequence": sequence,
            "data": data,
        }
        self._events.append(event)
        if len(self._events) > self._max_events + max(1, self._max_events // 8):
            drop = len(self._events) - self._max_events
            del self._events[:drop]
            self._first_sequence += drop
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("simulator %s: event subscriber %r failed", self.name, callback)


@contextmanager
def _outside_gc() -> Iterator[None]:
    """Build millions of small containers without the cyclic GC, then freeze them.

    Without this the collector runs while building (doubling the time) and,
    worse, every later full collection rescans the whole cloud: a 100k-vm full
    refresh served in-process took twice as long.  The cloud's objects hold
    no reference cycles, so refcounting alone frees them; ``gc.freeze`` only
    tells the cyclic collector not to look at what exists now.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _known(collection: str) -> str:
    if collection not in COLLECTIONS:
        raise NotFoundError(f"unknown collection {collection!r}; known: {', '.join(COLLECTIONS)}")
    return collection


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
