"""What a catcher is to the daemon, and how the daemon finds catchers.

Flow: event stream -> **catcher** -> (provider's event mapper) -> Target(s) + Ack -> batcher.

Catchers are found by name through entry points (group ``refreshd.catchers``),
so ``daemon`` never imports a catcher module.  The daemon builds each catcher
from its ``[[catchers]]`` options and a :class:`CatcherContext` (the sink, the
managers it may route to, each with its provider's ``map_event`` and optional
``routing_key``, the HTTP app for catchers that receive over HTTP, the
clock).  Shutdown is two-phase so that nothing is acknowledged early:
``stop()`` stops taking events in; the batcher then flushes and drains; only
then ``close()`` acknowledges what was committed and releases connections.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from types import TracebackType
from typing import Any, Protocol, Self

from aiohttp import web

from daemon.model.acks import TargetSink
from daemon.model.provider import (
    EventMapper,
    ManagerConnection,
    PluginUnavailableError,
    Provider,
    RoutingKey,
    connection_key,
    load_entry_point,
    routing_key_of,
)

CATCHER_GROUP = "refreshd.catchers"


@dataclass(frozen=True, slots=True)
class ManagerEndpoint:
    """What a catcher may know about a manager: its name, provider and event mapper."""

    name: str
    provider: str
    mapper: EventMapper
    connection: ManagerConnection | None = None
    """The open provider connection (in-process event sources read from it)."""
    routing_key: RoutingKey | None = None
    """The provider's ``routing_key`` (event -> key), None when it routes by no key."""

    @classmethod
    def of(
        cls,
        name: str,
        provider_name: str,
        provider: Provider,
        connection: ManagerConnection | None = None,
    ) -> ManagerEndpoint:
        """The endpoint of manager ``name``, with what its provider object offers."""
        return cls(name, provider_name, provider.map_event, connection, routing_key_of(provider))

    def connection_key(self) -> Hashable | None:
        """The open connection's ``routing_key`` (None: no connection, or not known yet)."""
        return connection_key(self.connection)


@dataclass(frozen=True, slots=True)
class CatcherContext:
    sink: TargetSink
    managers: Mapping[str, ManagerEndpoint]
    clock: Callable[[], float]
    """Loop time, for Ack.received_at."""
    http_app: web.Application | None = None
    """The daemon's HTTP app before it starts: catchers receiving over HTTP add routes."""
    token: str | None = None
    """Bearer token for catchers that authenticate senders (the [http] token)."""
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CatcherStats:
    """The counters every catcher keeps since start: what metrics and the status page read.

    A transport keeps its own further counters in a subclass (``KafkaCatcherStats``,
    ``SqsCatcherStats``, ...); the daemon reads only the fields below, by attribute.
    Plain numbers, written by the catcher only.
    """

    received: int = 0
    """Events read (``refreshd_events_received``)."""
    decoded: int = 0
    """Events decoded (``refreshd_events_decoded``)."""
    skipped: int = 0
    """Events that asked for no target (``refreshd_events_skipped``)."""
    submitted: int = 0
    """Events handed to the batcher."""
    acknowledged: int = 0
    """Events whose targets were all committed."""
    dead_lettered: dict[str, int] = field(default_factory=dict)
    """Events refused, by reason (``refreshd_events_dead_lettered{reason}``)."""
    lag: dict[str, int] = field(default_factory=dict)
    """Messages behind the stream's end, by stream: ``"topic/partition"``, a queue, a
    manager (``refreshd_consumer_lag{topic,partition}``)."""
    offset_resets: dict[str, int] = field(default_factory=dict)
    """Positions reset because they no longer fitted the log, by ``"topic/partition"``
    (``refreshd_kafka_offset_resets``)."""


class Catcher(Protocol):
    name: str

    async def start(self) -> None:
        """Start taking events in (returns once running)."""
        ...

    async def stop(self) -> None:
        """Stop taking events in; already-submitted events stay pending."""
        ...

    async def close(self) -> None:
        """Acknowledge what was committed, then release connections."""
        ...

    def healthy(self) -> bool:
        """False when the catcher's loop died or lost its stream."""
        ...

    def stats(self) -> CatcherStats:
        """Counters for metrics and the status line, up to date (the live object)."""
        ...


class ManagedCatcher:
    """A catcher used as an async context manager: ``async with`` starts it, leaving closes it.

    A catcher class subclasses it and overrides ``start`` and ``close``; a test or a tool
    then runs the catcher without the daemon: ``async with KafkaCatcher(...) as c:``.
    The daemon itself calls ``start``, ``stop`` and ``close`` (two-phase shutdown).
    """

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


CatcherFactory = Callable[[Mapping[str, Any], CatcherContext], Catcher]
"""``(options from [[catchers]], context) -> Catcher``; raises ValueError on bad options."""


class UnknownPluginError(LookupError):
    pass


@cache
def _plugins(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=group)}


def _load(group: str, name: str, what: str) -> Any:
    plugins = _plugins(group)
    if name not in plugins:
        known = ", ".join(sorted(plugins)) or "none"
        raise UnknownPluginError(f"unknown {what} {name!r}; installed: {known}")
    try:
        return load_entry_point(plugins[name], what)
    except PluginUnavailableError as exc:
        raise UnknownPluginError(str(exc)) from exc


def load_catcher(kind: str) -> CatcherFactory:
    factory: CatcherFactory = _load(CATCHER_GROUP, kind, "catcher type")
    return factory
