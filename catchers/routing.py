"""Routing: which manager, and which provider event mapper, an event belongs to.

Flow: raw record -> CloudEvent -> **route** -> EventMapper -> Target(s) -> batcher.

A catcher does not know managers or providers; it is given a :data:`Route`
built from the configuration.  A route is a plain function of the stream the
event came from (a Kafka topic, an SQS queue, a webhook path) and the decoded
event; it answers the manager name and the provider's pure event mapper, or
None when the event belongs to no configured manager (the catcher
dead-letters it).  The helpers here build the common routes (one manager per
catcher, one per stream, events naming their manager in a CloudEvents
attribute, or AWS events going to the manager of their account and region)
and :func:`route_from_options` picks one from a ``[[catchers]]`` block.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

from catchers.aws import account_region
from catchers.cloudevents import CloudEvent
from daemon.api import EventMapper, ManagerEndpoint

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


def route_by_account(managers: Mapping[str, ManagerEndpoint]) -> Route:
    """AWS events go to the ``aws`` manager of their account and region.

    The event's account and region come from :func:`catchers.aws.account_region`;
    a manager's from its open connection's ``account_region`` attribute
    (``(account id, region)``, or None while the connection does not know its
    account yet).  The table is rebuilt when an event finds no manager, so a
    connection that learns its account later is found.  When two managers
    share an account and region, the first configured one gets the events.
    ValueError when no manager has provider ``aws``.
    """
    aws = [m for m in managers.values() if m.provider == "aws"]
    if not aws:
        known = ", ".join(f"{m.name} ({m.provider})" for m in managers.values()) or "none"
        raise ValueError(
            f"manager_by_account needs a manager of provider 'aws' (configured: {known})"
        )
    table: dict[tuple[str, str], tuple[str, EventMapper]] = {}

    def rebuild() -> None:
        table.clear()
        for manager in aws:
            key = _account_region_of(manager.connection)
            if key is not None:
                table.setdefault(key, (manager.name, manager.mapper))

    rebuild()

    def route(stream: str, event: CloudEvent) -> tuple[str, EventMapper] | None:
        key = account_region({"data": event.data})
        if key is None:
            return None
        found = table.get(key)
        if found is None:
            rebuild()
            found = table.get(key)
        return found

    return route


def _account_region_of(connection: object) -> tuple[str, str] | None:
    """The ``account_region`` a connection knows, when it is a pair of non-empty strings."""
    key = getattr(connection, "account_region", None)
    if isinstance(key, tuple) and len(key) == 2:
        account, region = key
        if isinstance(account, str) and account and isinstance(region, str) and region:
            return (account, region)
    return None


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
    * ``manager_by_account = true``: AWS events go to the ``aws`` manager whose
      account and region are the event's (see :func:`route_by_account`);
      ``false`` is the same as leaving it out.
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
        return route_by_account(managers)
    attribute = options["manager_attribute"]
    if not isinstance(attribute, str) or not attribute:
        raise ValueError("'manager_attribute' must be an attribute name")
    return route_by_attribute(attribute, {name: endpoint(name) for name in managers})
