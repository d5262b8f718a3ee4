"""Routing: which manager, and which provider event mapper, an event belongs to.

Flow: raw record -> CloudEvent -> **route** -> EventMapper -> Target(s) -> batcher.

A catcher does not know managers or providers; it is given a :data:`Route`
built from the configuration.  A route is a plain function of the stream the
event came from (a Kafka topic, an SQS queue, a webhook path) and the decoded
event; it answers the manager name and the provider's pure event mapper, or
None when the event belongs to no configured manager (the catcher
dead-letters it).  The helpers here build the common routes (one manager per
catcher, one per stream, events naming their manager in a CloudEvents
attribute, or events going to the manager whose provider's routing key of the
event is its connection's key, e.g. an AWS account and region) and
:func:`route_from_options` picks one from a ``[[catchers]]`` block.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from catchers.cloudevents import CloudEvent
from daemon.api import EventMapper, ManagerEndpoint, RoutingKey

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


def route_by_key(managers: Mapping[str, ManagerEndpoint]) -> Route:
    """Events go to the manager whose connection's key is its provider's key of the event.

    The candidates are the managers whose provider has a ``routing_key``
    (``ManagerEndpoint.routing_key``, e.g. AWS: the event's account and
    region); a manager's key is its open connection's ``routing_key``
    (:meth:`ManagerEndpoint.connection_key`, None while the connection does not
    know it yet).  The table is rebuilt when an event finds no manager, so a
    connection that learns its key later is found.  When two managers share a
    key, the first configured one gets the events.  ValueError when no
    manager's provider has a routing key.
    """
    keyed = [(m, m.routing_key) for m in managers.values() if m.routing_key is not None]
    if not keyed:
        known = ", ".join(f"{m.name} ({m.provider})" for m in managers.values()) or "none"
        raise ValueError(
            "manager_by_account needs a manager whose provider routes events by key"
            f" (configured: {known})"
        )
    key_functions = list(dict.fromkeys(key_of for _, key_of in keyed))
    tables: dict[RoutingKey, dict[Hashable, tuple[str, EventMapper]]] = {}
    """Per routing key function: connection key -> (manager, mapper)."""

    def rebuild() -> None:
        tables.clear()
        for manager, key_of in keyed:
            key = manager.connection_key()
            if key is not None:
                tables.setdefault(key_of, {}).setdefault(key, (manager.name, manager.mapper))

    def lookup(keys: list[tuple[RoutingKey, Hashable]]) -> tuple[str, EventMapper] | None:
        for key_of, key in keys:
            found = tables.get(key_of, {}).get(key)
            if found is not None:
                return found
        return None

    rebuild()

    def route(stream: str, event: CloudEvent) -> tuple[str, EventMapper] | None:
        decoded = event.to_dict()
        keys = [(key_of, key) for key_of in key_functions if (key := key_of(decoded)) is not None]
        if not keys:
            return None
        found = lookup(keys)
        if found is None:
            rebuild()
            found = lookup(keys)
        return found

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


ROUTING_OPTIONS = ("manager", "managers", "manager_attribute", "manager_by_account")
"""The catcher options that choose a route (exactly one is given)."""


def _given(key: str, value: Any) -> bool:
    if key != "manager_by_account":
        return value is not None
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"'manager_by_account' must be true or false, not {value!r}")
    return value is True


def route_from_options(
    options: Mapping[str, Any], managers: Mapping[str, ManagerEndpoint]
) -> Route:
    """Build a route from a catcher's options; ValueError names what is wrong.

    * ``manager = "aws-prod"``: every event of the catcher belongs to that manager;
    * ``managers = {"<stream>" = "<manager>", ...}``: one manager per topic/queue/path;
    * ``manager_attribute = "<attribute>"``: a CloudEvents attribute or extension
      whose value is the manager name;
    * ``manager_by_account = true``: by the provider's routing key: an event goes
      to the manager whose connection's key is its provider's key of the event
      (for AWS: the account and region, see :func:`route_by_key`); ``false`` is
      the same as leaving it out.  The option keeps its name, a public config key.
    """
    given = [key for key in ROUTING_OPTIONS if _given(key, options.get(key))]
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
    if given == ["manager_by_account"]:
        return route_by_key(managers)
    attribute = options["manager_attribute"]
    if not isinstance(attribute, str) or not attribute:
        raise ValueError("'manager_attribute' must be an attribute name")
    return route_by_attribute(attribute, {name: endpoint(name) for name in managers})
