"""Manager ownership: which process may refresh a manager, across every process of one database.

Flow: catchers -> batcher --(**may it start?**)--> refresher -> persister --(**fence**)--> commit.

Many ``refreshd run`` processes may share a database (DESIGN.md 6 and 12).  A
process refreshes a manager only while it *owns* it; owning spans any number
of refreshes, so the batcher may overlap the next collect with the previous
commit inside the owning process.  docs/scaling.md explains the choice.

On PostgreSQL :class:`daemon.pipeline.postgres_ownership.PostgresOwnership` owns managers
through session advisory locks (see that module).  Every refresh carries the holding it
started under (:func:`fenced`, :func:`fenced_collect`; daemon/persistence/fencing.py): the
persister refuses to commit when another process took the manager since.

On SQLite (one process by design) :class:`LocalOwnership` owns everything.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from daemon.persistence.fencing import FENCE, Holding, OwnershipLostError


def default_instance_name() -> str:
    """``hostname:pid``: the process identity shown in /managers and metrics."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Owner:
    """The process that owns a manager now, seen from any process."""

    instance: str
    since: datetime


@dataclass(frozen=True, slots=True)
class OwnershipSettings:
    keepalive: float = 2.0
    """Seconds between keepalives on the ownership connection (also how often a
    manager another process holds is tried again)."""
    session_timeout: float = 10.0
    """Seconds of silence after which the server ends a session (and the client gives
    up on a statement); a hung or unreachable process loses its managers after this."""
    release_after: float = 5.0
    """Seconds without pending or running refreshes before a manager is given back."""
    save_idle_timeout: float = 120.0
    """Seconds a save transaction may wait idle for the collector's next page before the
    server ends it (a process hung inside a save frees the manager after this)."""


class WorkView(Protocol):
    """What ownership reads from the batcher: does this process have work for a manager?"""

    def pending_count(self, manager: str | None = None) -> int: ...

    def in_flight_managers(self) -> frozenset[str]: ...


class Ownership(Protocol):
    """What the batcher, refresher, scheduler, HTTP endpoint and metrics use."""

    instance: str

    def may_start(self, manager: str) -> bool:
        """Whether a refresh of ``manager`` may start now (asks for it when not)."""
        ...

    def holding(self, manager: str) -> Holding | None: ...

    def holdings(self) -> Mapping[str, Holding]: ...

    def hold(self, manager: str) -> contextlib.AbstractAsyncContextManager[bool]:
        """Try to own ``manager`` now; yields whether it is owned, kept while inside."""
        ...

    async def owners(self, conn: AsyncConnection) -> dict[str, Owner]:
        """Who owns each manager now, across processes (for /managers)."""
        ...


C = TypeVar("C")
R = TypeVar("R")


def _owned(ownership: Ownership, manager: str) -> Holding:
    """The holding ``manager`` is owned under; raises when this process does not own it."""
    holding = ownership.holding(manager)
    if holding is None:
        raise OwnershipLostError(manager, "not owned by this process")
    return holding


@contextlib.contextmanager
def _carrying(holding: Holding) -> Iterator[None]:
    """Run the body with :data:`FENCE` set to ``holding`` (what the persister checks)."""
    token = FENCE.set(holding)
    try:
        yield
    finally:
        FENCE.reset(token)


def fenced(
    refresh: Callable[[C], Awaitable[R]], ownership: Ownership, manager_of: Callable[[C], str]
) -> Callable[[C], Awaitable[R]]:
    """Wrap a refresh function so it runs only under ownership, carrying its :data:`FENCE`."""

    async def run(collection: C) -> R:
        with _carrying(_owned(ownership, manager_of(collection))):
            return await refresh(collection)

    return run


def fenced_collect(
    collect: Callable[[C], Awaitable[Callable[[], Awaitable[R]] | None]],
    ownership: Ownership,
    manager_of: Callable[[C], str],
) -> Callable[[C], Awaitable[Callable[[], Awaitable[R]] | None]]:
    """Wrap a collect-then-persist split (``Refresher.collect``) like :func:`fenced`: the
    collect runs only under ownership, and its persist commits only under the holding the
    collect began with (an overlapped batch cannot commit after a takeover)."""

    async def run(collection: C) -> Callable[[], Awaitable[R]] | None:
        holding = _owned(ownership, manager_of(collection))
        with _carrying(holding):
            persist = await collect(collection)
        if persist is None:
            return None
        ready = persist

        async def fenced_persist() -> R:
            with _carrying(holding):
                return await ready()

        return fenced_persist

    return run


class OwnedHoldings:
    """``holding``/``holdings`` of an :class:`Ownership`, read from ``_owned``."""

    _owned: dict[str, Holding]

    def holding(self, manager: str) -> Holding | None:
        return self._owned.get(manager)

    def holdings(self) -> Mapping[str, Holding]:
        return dict(self._owned)


class LocalOwnership(OwnedHoldings):
    """SQLite: the only process owns every manager from start to stop."""

    def __init__(self, managers: Mapping[str, int], *, instance: str) -> None:
        self.instance = instance
        since = datetime.now(UTC)
        self._owned = {m: Holding(m, instance, since, None) for m in managers}
        self.changes: dict[tuple[str, str], int] = {}

    def may_start(self, manager: str) -> bool:
        return True

    @contextlib.asynccontextmanager
    async def hold(self, manager: str) -> AsyncIterator[bool]:
        yield manager in self._owned

    async def owners(self, conn: AsyncConnection) -> dict[str, Owner]:
        return {m: Owner(h.instance, h.since) for m, h in self._owned.items()}

    async def start(self) -> None:
        """Nothing to open."""

    async def stop(self) -> None:
        """Nothing to close."""
