"""PostgreSQL manager ownership: session advisory locks on one dedicated connection per process.

Flow: batcher --(may it start?)--> **PostgresOwnership** (keepalive loop) -> ``managers``.

The protocol, the SQLite ownership and the fence wrappers are in
:mod:`daemon.pipeline.ownership`.

* a process owns a manager while its one dedicated *ownership connection*
  holds the session-level advisory lock ``(OWNERSHIP_NAMESPACE, manager id)``;
  the connection runs a keepalive every ``keepalive`` seconds and the server
  ends it after ``session_timeout`` of silence (``idle_session_timeout``, TCP
  keepalives), so a process that dies or hangs frees its managers within
  seconds;
* ownership is taken on demand (the batcher has a due batch, the scheduler
  asks) and given back after ``release_after`` seconds without work; a
  process waiting for a manager shows it with a shared advisory lock
  ``(WANT_NAMESPACE, manager id)``, and the owner then gives it back at once
  when idle, or between two refreshes once it has held it ``release_after``;
* taking a manager increments ``managers.owner_epoch`` (and records ``owner``
  and ``owner_since``); that UPDATE waits for a commit of the previous owner
  still in progress, so a new owner's first collect starts after the old
  owner's last commit;
* every refresh carries the holding it started under (daemon/persistence/fencing.py);
  the persister refuses to commit when another process took the manager
  since: an older collect never overwrites a newer commit;
* when the ownership connection fails, the process drops every manager at
  once (no refresh starts) and connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from daemon.persistence.fencing import Holding
from daemon.pipeline.clock import LOOP_CLOCK, Clock
from daemon.pipeline.ownership import OwnedHoldings, Owner, OwnershipSettings, WorkView

log = logging.getLogger(__name__)

OWNERSHIP_NAMESPACE = 0x5246484F  # "RFHO": first key of pg_try_advisory_lock(int, int)
WANT_NAMESPACE = 0x52464857  # "RFHW": shared locks of processes waiting for a manager
DEFAULT_SETTINGS = OwnershipSettings()


THIS_DATABASE = "(SELECT oid FROM pg_database WHERE datname = current_database())"
"""Advisory locks are per database, but ``pg_locks`` lists every database's: each query
of them is limited to this one (another deployment on the same server has managers
with the same ids)."""


class PostgresOwnership(OwnedHoldings):
    """Owns managers through session advisory locks on one dedicated connection."""

    def __init__(
        self,
        url: URL,
        *,
        managers: Mapping[str, int],
        instance: str,
        work: WorkView,
        settings: OwnershipSettings = DEFAULT_SETTINGS,
        on_acquired: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.instance = instance
        self._url = url
        self._ids = dict(managers)
        self._work = work
        self._settings = settings
        self._clock: Clock = LOOP_CLOCK  # real time: the server's timeouts are real time
        self._on_acquired = on_acquired
        self._owned: dict[str, Holding] = {}
        self._idle_since: dict[str, float] = {}
        self._wanted: set[str] = set()
        self._refused_at: dict[str, float] = {}
        self._owned_at: dict[str, float] = {}
        self._yielding: set[str] = set()
        """Owned managers being handed over: no new refresh starts; released when idle."""
        self._handed_over_at: dict[str, float] = {}
        self._wanting: set[str] = set()
        """Managers another process owns that this one waits for (shared WANT lock held)."""
        self._pins: dict[str, int] = {}
        self._conn: AsyncConnection | None = None
        self._engine: AsyncEngine | None = None
        self._conn_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.changes: dict[tuple[str, str], int] = {}
        """(manager, change) -> count, change in acquired / released / lost (metrics)."""

    # -- Ownership ----------------------------------------------------------------

    def may_start(self, manager: str) -> bool:
        if manager in self._owned:
            return manager not in self._yielding
        # ask the keepalive loop now, unless it was refused less than a keepalive ago
        # (the batcher asks on every wake-up; another process may hold it for long)
        now = self._clock.now()
        refused = self._refused_at.get(manager)
        if manager in self._ids and (refused is None or now - refused >= self._settings.keepalive):
            self._wanted.add(manager)
            self._wake.set()
        return False

    @contextlib.asynccontextmanager
    async def hold(self, manager: str) -> AsyncIterator[bool]:
        self._pins[manager] = self._pins.get(manager, 0) + 1
        try:
            if manager not in self._owned:
                try:
                    async with self._conn_lock:
                        if self._conn is not None:
                            await self._acquire(self._conn, manager)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 -- the keepalive loop reconnects
                    log.warning("manager %s: could not take ownership: %s", manager, exc)
            yield manager in self._owned
        finally:
            self._pins[manager] -= 1
            if not self._pins[manager]:
                del self._pins[manager]

    async def owners(self, conn: AsyncConnection) -> dict[str, Owner]:
        return await current_owners(conn)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Connect and keep the ownership connection alive in a task (idempotent)."""
        if self._task is None:
            self._engine = create_async_engine(self._url, poolclass=NullPool)
            try:  # connected before the scheduler asks for its first manager
                await self._connect()
            except Exception as exc:  # noqa: BLE001 -- the loop retries
                log.warning("ownership connection not open yet: %s", exc)
            self._task = asyncio.create_task(self._run(), name="refreshd-ownership")

    async def stop(self) -> None:
        """Give every manager back (closing the session releases its locks)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        self._drop_all("released")
        await self._close()
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    # -- the keepalive loop ---------------------------------------------------------

    async def _run(self) -> None:
        delay = self._settings.keepalive
        while True:
            try:
                if self._conn is None:
                    await self._connect()
                delay = self._settings.keepalive
                while True:
                    await self._tick()
                    self._wake.clear()
                    deadline = self._clock.now() + self._settings.keepalive
                    await self._clock.wait_event(self._wake, deadline)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 -- any failure: drop, reconnect
                lost = sorted(self._owned)
                self._drop_all("lost")
                log.warning(
                    "ownership connection failed (%s: %s); dropped manager(s) %s; "
                    "reconnecting in %.0fs",
                    type(exc).__name__,
                    exc,
                    ", ".join(lost) or "none",
                    delay,
                )
                await self._close()
                await self._clock.sleep_until(self._clock.now() + delay)
                delay = min(delay * 2, 30.0)

    async def _connect(self) -> None:
        assert self._engine is not None
        conn = await asyncio.wait_for(self._engine.connect(), self._settings.session_timeout)
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        timeout_ms = int(self._settings.session_timeout * 1000)
        idle_s = max(1, int(self._settings.session_timeout / 2))
        version = (await conn.execute(text("SHOW server_version_num"))).scalar()
        if int(version or 0) >= 140000:  # PostgreSQL 13 has no idle_session_timeout
            await conn.execute(text(f"SET idle_session_timeout = {timeout_ms}"))
        for statement in (
            f"SET statement_timeout = {timeout_ms}",
            f"SET lock_timeout = {int(self._settings.keepalive * 1000)}",
            f"SET tcp_keepalives_idle = {idle_s}",
            "SET tcp_keepalives_interval = 1",
            "SET tcp_keepalives_count = 3",
            f"SET application_name = 'refreshd ownership {self.instance[:40]}'",
        ):
            await conn.execute(text(statement))
        self._conn = conn
        log.info("ownership connection open (instance %s)", self.instance)

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)

    async def _tick(self) -> None:
        """Keepalive; take managers with work, give back idle ones and contested ones."""
        async with self._conn_lock:
            conn = self._conn
            assert conn is not None
            contested = await self._wanted_elsewhere(conn)  # also the keepalive
            now = self._clock.now()
            for manager in sorted(self._ids):
                if manager in self._owned:
                    await self._keep_or_give(conn, manager, now, self._ids[manager] in contested)
                elif self._has_work(manager):
                    handed = self._handed_over_at.get(manager, -math.inf)
                    if now - handed >= 2 * self._settings.keepalive:  # let a waiter take it
                        await self._acquire(conn, manager)
                    if manager not in self._owned:
                        await self._want(conn, manager, wanting=True)
                else:
                    await self._want(conn, manager, wanting=False)
            self._wanted.clear()

    def _has_work(self, manager: str) -> bool:
        return (
            manager in self._work.in_flight_managers()
            or self._work.pending_count(manager) > 0
            or manager in self._pins
            or manager in self._wanted
        )

    async def _keep_or_give(
        self, conn: AsyncConnection, manager: str, now: float, contested: bool
    ) -> None:
        """Give ``manager`` back when idle for ``release_after`` (at once when another
        process waits), or, when another process waited and this one has held it for
        ``release_after``, hand it over between two refreshes (its targets stay pending)."""
        await self._want(conn, manager, wanting=False)
        if self._has_work(manager):
            self._idle_since.pop(manager, None)
            idle = False
        else:
            idle = now - self._idle_since.setdefault(manager, now) >= self._settings.release_after
        held = now - self._owned_at.get(manager, now)
        if contested and not idle and held >= self._settings.release_after:
            if manager not in self._yielding:
                log.info("manager %s: another process waits for it; handing over", manager)
            self._yielding.add(manager)
        running = manager in self._work.in_flight_managers() or manager in self._pins
        if running:
            return
        if idle or (contested and not self._has_work(manager)):
            await self._release(conn, manager, why="no work")
        elif manager in self._yielding:
            self._handed_over_at[manager] = self._refused_at[manager] = now
            await self._release(conn, manager, why="handed over")

    async def _wanted_elsewhere(self, conn: AsyncConnection) -> set[int]:
        """Ids of managers other processes wait for."""
        rows = await self._run_sql(
            conn,
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = :ns "
            "AND objsubid = 2 AND granted AND pid <> pg_backend_pid() AND database = "
            + THIS_DATABASE,
            {"ns": WANT_NAMESPACE},
        )
        return {int(r.objid) for r in rows}

    async def _want(self, conn: AsyncConnection, manager: str, *, wanting: bool) -> None:
        """Show (shared session lock) or stop showing that this process waits for ``manager``."""
        if wanting == (manager in self._wanting):
            return
        key = {"ns": WANT_NAMESPACE, "id": self._ids[manager]}
        if wanting:
            await self._run_sql(conn, "SELECT pg_advisory_lock_shared(:ns, :id)", key)
            self._wanting.add(manager)
        else:
            self._wanting.discard(manager)
            await self._run_sql(conn, "SELECT pg_advisory_unlock_shared(:ns, :id)", key)

    async def _run_sql(self, conn: AsyncConnection, sql: str, params: dict[str, Any]) -> Any:
        result = await asyncio.wait_for(
            conn.execute(text(sql), params), self._settings.session_timeout
        )
        return result

    async def _acquire(self, conn: AsyncConnection, manager: str) -> None:
        """Take ``manager`` if it is free (the caller holds ``_conn_lock``)."""
        if manager in self._owned:
            # taken meanwhile (the keepalive loop and a hold() both asked): a session lock
            # is reentrant, and one taken twice would survive the one unlock of a release
            return
        key = {"ns": OWNERSHIP_NAMESPACE, "id": self._ids[manager]}
        got = (await self._run_sql(conn, "SELECT pg_try_advisory_lock(:ns, :id)", key)).scalar()
        if not got:
            self._refused_at[manager] = self._clock.now()
            return
        self._refused_at.pop(manager, None)
        try:
            # waits (lock_timeout) for a commit of the previous owner still in progress
            row = (
                await self._run_sql(
                    conn,
                    "UPDATE managers SET owner = :owner, owner_since = now(), "
                    "owner_epoch = owner_epoch + 1 WHERE id = :id "
                    "RETURNING owner_epoch, owner_since",
                    {"owner": self.instance, "id": key["id"]},
                )
            ).one()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- e.g. lock_timeout: give it back, retry later
            log.info("manager %s: not taken over yet (%s); retrying", manager, exc)
            self._refused_at[manager] = self._clock.now()
            await self._run_sql(conn, "SELECT pg_advisory_unlock(:ns, :id)", key)
            return
        self._owned[manager] = Holding(
            manager,
            self.instance,
            row.owner_since,
            int(row.owner_epoch),
            self._settings.save_idle_timeout,
        )
        self._owned_at[manager] = self._clock.now()
        self._idle_since.pop(manager, None)
        self._count(manager, "acquired")
        log.info("manager %s: owned by this process (epoch %d)", manager, row.owner_epoch)
        self._on_acquired(manager)

    async def _release(self, conn: AsyncConnection, manager: str, *, why: str) -> None:
        # first stop new refreshes (synchronously), then unlock
        del self._owned[manager]
        self._yielding.discard(manager)
        self._idle_since.pop(manager, None)
        self._count(manager, "released")
        key = {"ns": OWNERSHIP_NAMESPACE, "id": self._ids[manager]}
        await self._run_sql(conn, "SELECT pg_advisory_unlock(:ns, :id)", key)
        log.info("manager %s: released (%s)", manager, why)

    def _drop_all(self, change: str) -> None:
        for manager in self._owned:
            self._count(manager, change)
        self._owned.clear()
        self._idle_since.clear()
        self._yielding.clear()
        self._wanting.clear()  # the session's locks are gone with it

    def _count(self, manager: str, change: str) -> None:
        self.changes[(manager, change)] = self.changes.get((manager, change), 0) + 1


async def current_owners(conn: AsyncConnection) -> dict[str, Owner]:
    """Per manager name: the instance holding it now and since when (absent: nobody)."""
    rows = await conn.execute(
        text(
            "SELECT m.name, m.owner, m.owner_since, EXISTS ("
            " SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
            " AND l.classid = :ns AND l.objid = m.id AND l.objsubid = 2"
            " AND l.database = " + THIS_DATABASE + ") AS held"
            " FROM managers m"
        ),
        {"ns": OWNERSHIP_NAMESPACE},
    )
    return {r.name: Owner(r.owner, r.owner_since) for r in rows if r.held and r.owner}
