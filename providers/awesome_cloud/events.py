"""AwesomeCloud event mapping: one decoded CloudEvent -> the Targets it asks to refresh.

Flow: raw record -> CloudEvent -> route -> **AwesomeCloud event mapper** -> Target(s) -> batcher.

:func:`map_event` is the provider's ``map_event`` (``AwesomeCloudProvider``).
It is a pure function of the manager name and the event as a dict (the
structured JSON shape: ``specversion``, ``id``, ``source``, ``type``,
``subject``, ``time``, ``data`` and the extensions as top-level keys).  The
simulator emits ``com.awesomecloud.<kind>.<action>`` with the object's id
as ``subject``:

* ``vm`` / ``image`` / ``flavor`` / ``security_group`` with action
  ``created`` / ``updated`` / ``deleted`` -> that object.  Disks and ports are
  part of their vm: a disk or port change arrives as ``vm.updated``.  The
  action does not change the target: a refresh fetches the current state, and
  an object the cloud no longer has is archived because it is absent.
* any other ``com.awesomecloud.*`` event whose ``data`` names a ``vm_id``
  (disk/port-style events) -> that vm;
* any other ``com.awesomecloud.*`` event -> no target (the catcher counts it
  as skipped: a new kind of event is not an error).

An event that cannot be an AwesomeCloud event (another type prefix) or that
lacks the id it needs (no ``subject``, a non-string ``vm_id``) raises
:class:`ValueError` with the reason; catchers dead-letter or reject it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from daemon.api import Target

TYPE_PREFIX: Final = "com.awesomecloud."

COLLECTION_OF_KIND: Final[Mapping[str, str]] = {
    "vm": "vms",
    "image": "images",
    "flavor": "flavors",
    "security_group": "security_groups",
}
"""The event kinds that name a top-level object, and that object's collection."""

ACTIONS: Final = frozenset({"created", "updated", "deleted"})


def map_event(manager: str, event: dict[str, Any]) -> list[Target]:
    """The targets ``event`` asks to refresh in ``manager`` (``[]``: nothing to do).

    Raises ValueError when ``event`` is not a usable AwesomeCloud event.
    """
    event_type = event.get("type")
    if not isinstance(event_type, str) or not event_type.startswith(TYPE_PREFIX):
        raise ValueError(f"not an AwesomeCloud event: type {event_type!r}")
    event_id = event.get("id")
    event_id = event_id if isinstance(event_id, str) else None
    kind, _, action = event_type[len(TYPE_PREFIX) :].rpartition(".")
    collection = COLLECTION_OF_KIND.get(kind)
    if collection is not None and action in ACTIONS:
        subject = event.get("subject")
        if not isinstance(subject, str) or not subject:
            raise ValueError(f"{event_type} event {event_id!r} has no subject (the object id)")
        return [Target.of(manager, collection, subject, event_id=event_id)]
    data = event.get("data")
    if isinstance(data, Mapping) and "vm_id" in data:
        vm_id = data["vm_id"]
        if not isinstance(vm_id, str) or not vm_id:
            raise ValueError(f"{event_type} event {event_id!r}: data.vm_id is not an id")
        return [Target.of(manager, "vms", vm_id, event_id=event_id)]
    return []
