"""The one intake of every catcher: route -> map -> validate, or an EventRejection saying why not.

Flow: transport (decodes) -> CloudEvent -> **route -> EventMapper -> Target(s)** (checked)
-> the transport hands them to the batcher; or **EventRejection** -> the transport's policy.

Every catcher decodes its own wire format, then calls :func:`map_event` (an
event that must be routed to its manager) or :func:`apply_mapper` (an event
whose manager is already known).  A route or mapper that raises, a route that
answers None, and a mapper that returns anything but Targets never stop a
stream: each becomes one :class:`EventRejection` with a :class:`DeadLetterReason`
(``undecodable`` comes from :func:`undecodable`, for the transport's decoder).

The error policy, what each transport does with a rejection (all count it in
``CatcherStats.dead_lettered`` by reason, that is ``refreshd_events_dead_lettered``):

====================  ==========================================================
kafka                 copy the record to the dead-letter topic (reason and
                      message in its headers), in offset order; stream goes on
sqs                   release the message to the queue's redrive policy (or
                      delete it with ``delete_poison``), logging it
webhook               answer 400 with the message; a bug (:attr:`EventRejection.bug`:
                      a route or mapper raising anything but ValueError, or a
                      mapper returning non-Targets) is answered 500
inprocess             log it and pass the event over (no dead-letter store)
====================  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from catchers.cloudevents import CloudEvent
from catchers.routing import DeadLetterReason, Route
from catchers.wire import DecodeError
from daemon.api import EventMapper, Target


@dataclass(frozen=True, slots=True)
class EventRejection:
    """Why an event is refused (dead-lettered, answered 400/500, or logged and passed over)."""

    reason: DeadLetterReason
    message: str
    """What went wrong, in words (the dead-letter header, the log line)."""
    decoded: bool
    """The event decoded (it failed at routing or mapping)."""
    manager: str | None = None
    """The manager the event was routed to (None: undecodable or unroutable)."""
    error: Exception | None = None
    """What the route or the mapper raised; for a non-Target return, a TypeError."""
    returned: str | None = None
    """The type name of a non-Target the mapper returned."""

    @property
    def bug(self) -> bool:
        """A route or mapper failed in an unplanned way (not a ValueError refusing the event)."""
        if self.returned is not None:
            return True
        return self.error is not None and not (
            self.reason is DeadLetterReason.MAPPER_ERROR and isinstance(self.error, ValueError)
        )


def undecodable(exc: DecodeError) -> EventRejection:
    """The rejection of bytes that are not an event."""
    return EventRejection(DeadLetterReason.UNDECODABLE, exc.reason, decoded=False)


def map_event(
    route: Route, stream: str, event: CloudEvent, *, where: str = ""
) -> list[Target] | EventRejection:
    """Route ``event`` (which came from ``stream``) to its manager and map it to Targets.

    ``where`` is added to the words of an unroutable event (``", topic 't'"``).
    """
    try:
        routed = route(stream, event)
    except Exception as exc:  # noqa: BLE001 - a routing bug must not stop the stream
        reason = f"route raised {type(exc).__name__}: {exc}"
        return EventRejection(DeadLetterReason.UNROUTABLE, reason, decoded=True, error=exc)
    if routed is None:
        reason = (
            f"no manager for event {event.id!r} "
            f"(type {event.type!r}, source {event.source!r}{where})"
        )
        return EventRejection(DeadLetterReason.UNROUTABLE, reason, decoded=True)
    manager, mapper = routed
    return apply_mapper(manager, mapper, event.to_dict())


def apply_mapper(
    manager: str, mapper: EventMapper, event: dict[str, Any]
) -> list[Target] | EventRejection:
    """``mapper(manager, event)`` as a list of Targets, or the rejection of what it did instead."""
    try:
        returned = mapper(manager, event)
        targets = returned if type(returned) is list else list(returned)
    except Exception as exc:  # noqa: BLE001 - a mapper bug must not stop the stream
        return _mapper_failed(manager, exc)
    for target in targets:
        if not isinstance(target, Target):
            name = type(target).__name__
            return _mapper_failed(manager, TypeError(f"returned a {name}, not a Target"), name)
    return targets


def _mapper_failed(manager: str, exc: Exception, returned: str | None = None) -> EventRejection:
    return EventRejection(
        DeadLetterReason.MAPPER_ERROR,
        f"mapper of manager {manager!r} raised {type(exc).__name__}: {exc}",
        decoded=True,
        manager=manager,
        error=exc,
        returned=returned,
    )


def dead_letter_counts() -> dict[str, int]:
    """A zero count for every :class:`DeadLetterReason` (each is exported, even at 0)."""
    return dict.fromkeys(map(str, DeadLetterReason), 0)
