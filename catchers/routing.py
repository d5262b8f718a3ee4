"""Routing: which manager, and which provider event mapper, an event belongs to.

Flow: raw record -> CloudEvent -> **route** -> EventMapper -> Target(s) -> batcher.

A catcher does not know managers or providers; it is given a :data:`Route`
built from the configuration.  A route is a plain function of the stream the
event came from (a Kafka topic, an SQS queue, a webhook path) and the decoded
event; it answers the manager name and the provider's pure event mapper, or
None when the event belongs to no configured manager (the catcher
dead-letters it).  The helpers here build the common routes (one manager per
catcher, one per stream, or events naming their manager in a CloudEvents
attribute) and :func:`route_from_options` picks one from a ``[[catchers]]`` block.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

from catchers.cloudevents import CloudEvent
from daemon.catcher import ManagerEndpoint
from daemon.provider import EventMapper

_CONTEXT_ATTRIBUTES = frozenset({"id", "source", "type", "subject", "dataschema"})


class DeadLetterReason(enum.StrEnum):
    """Why a catcher refused an event (dead-lettered, or answered 400): a metrics label."""

    UNDECODABLE = "undecodable"
    UNROUTABLE = "unroutable"
    MAPPER_ERROR = "mapper_error"


Route = Callable[[str, CloudEvent], tuple[str, EventMapper] | None]
"""``(stream, event) -> (manager, mapper)``, or None when the event is unroutable."""


def route_by_stream(table: Mapping[str, tuple[str, EventMapper]]) -> Route:
    """Each stream (topic, queue, path) carries the events of one manager."""
    frozen = dict(table)

    def route(stream: str, event: CloudEvent) -> tuple[str, EventMapper] | None:
        return frozen.get(stream)

    return route


def route_by_attribute(attribute: str, table: Mapping[str, tuple[str, EventMapper]]) -> Route:
    """Events name their manager key in a context attribute or extension.

    ``attribute`` is ``"source"``, ``"subject"``, ``"type"`` or an extension
    name; its value is looked up in ``table``.  Plain (non-CloudEvents)
    events carry no attributes and are unroutable here.
    """
    frozen = dict(table)

    def route(stream: str, event: CloudEvent) -> tuple[str, EventMapper] | None:
        if attribute in _CONTEXT_ATTRIBUTES:
            value = getattr(event, attribute)
        else:
            value = event.extensions.get(attribute)
        return frozen.get(str(value)) if value is not None else None

    return route


def first_route(*routes: Route) -> Route:
    """The first route that answers."""

    def route(stream: str, event: CloudEvent) -> tuple[str, EventMapper] | None:
        for candidate in routes:
            found = candidate(stream, event)
            if found is not None:
                return found
        return None

    return route


ROUTING_OPTIONS = ("manager", "managers", "manager_attribute")
"""The catcher options that choose a route (exactly one is given)."""


def route_from_options(
    options: Mapping[str, Any], managers: Mapping[str, ManagerEndpoint]
) -> Route:
    """Build a route from a catcher's options; ValueError names what is wrong.

    * ``manager = "aws-prod"``: every event of the catcher belongs to that manager;
    * ``managers = {"<stream>" = "<manager>", ...}``: one manager per topic/queue/path;
    * ``manager_attribute = "<attribute>"``: a CloudEvents attribute or extension
      whose value is the manager name.
    """
    given = [key for key in ROUTING_OPTIONS if options.get(key) is not None]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of {', '.join(ROUTING_OPTIONS)} (got {given or 'none'})"
        )

    def endpoint(name: Any) -> tuple[str, EventMapper]:
        if not isinstance(name, str) or name not in managers:
            known = ", ".join(sorted(managers)) or "none"
            raise ValueError(f"unknown manager {name!r} (configured: {known})")
        return (name, managers[name].mapper)

    if given == ["manager"]:
        single = endpoint(options["manager"])
        return lambda stream, event: single
    if given == ["managers"]:
        table = options["managers"]
        if not isinstance(table, Mapping) or not table:
            raise ValueError("'managers' must be a non-empty table of stream = manager")
        return route_by_stream({str(k): endpoint(v) for k, v in table.items()})
    attribute = options["manager_attribute"]
    if not isinstance(attribute, str) or not attribute:
        raise ValueError("'manager_attribute' must be an attribute name")
    return route_by_attribute(attribute, {name: endpoint(name) for name in managers})
