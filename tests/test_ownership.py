"""Manager ownership on PostgreSQL, two owners in one test process (two "daemons").

What a user would notice: a process that lost its ownership connection stops
refreshing and cannot commit a refresh it began before, while another process
takes the manager over; ownership follows work and is given back when idle.
The multi-process behaviour (SIGKILL, start-up race, stale write) is in
tests/test_scaleout.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.inventory import InventoryPage
from daemon.model.targets import Target, TargetCollection
from daemon.persistence.db import create_engine, normalize_url
from daemon.persistence.fencing import FENCE, OwnershipLostError
from daemon.persistence.migrate import upgrade
from daemon.persistence.persister import Persister
from daemon.pipeline.ownership import OwnershipSettings
from daemon.pipeline.postgres_ownership import PostgresOwnership, current_owners
from tests.daemon_process import wait_for
from tests.fixtures.postgres import _admin
from tests.inventory_builders import pages, snapshot

pytestmark = pytest.mark.postgres

PATIENT = OwnershipSettings(keepalive=0.2, session_timeout=3.0, release_after=60.0)
FAIR = OwnershipSettings(keepalive=0.2, session_timeout=3.0, release_after=0.5)


class Work:
    """What the batcher would report: managers with pending targets."""

    def __init__(self) -> None:
        self.pending: set[str] = set()

    def pending_count(self, manager: str | None = None) -> int:
        return int(manager in self.pending)

    def in_flight_managers(self) -> frozenset[str]:
        return frozenset()


@pytest.fixture
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(pg_url)
    await upgrade(eng)
    yield eng
    await eng.dispose()


def flavor_page(name: str) -> InventoryPage:
    return InventoryPage(rows={"flavors": [{"ems_ref": "f1", "name": name, "cpus": 1}]})


async def flavor_name(engine: AsyncEngine) -> str | None:
    snap = await snapshot(engine)
    return next((row["name"] for row in snap["flavors"].values()), None)


async def test_a_process_that_loses_its_connection_stops_and_cannot_commit(
    engine: AsyncEngine, pg_url: str
) -> None:
    persister = Persister(engine)
    ids = {"m1": await persister.ensure_manager("m1", "awesome_cloud")}
    work_a, work_b = Work(), Work()
    a = PostgresOwnership(
        normalize_url(pg_url), managers=ids, instance="a", work=work_a, settings=PATIENT
    )
    b = PostgresOwnership(
        normalize_url(pg_url), managers=ids, instance="b", work=work_b, settings=FAIR
    )
    await a.start()
    await b.start()
    try:
        targets = TargetCollection("m1", [Target.of("m1", "flavors", "f1")])
        work_a.pending.add("m1")
        assert not a.may_start("m1")  # asks for it ...
        await wait_for(lambda: a.may_start("m1"), timeout=10, what="a to own m1")
        held_by_a = a.holding("m1")
        work_b.pending.add("m1")  # ... b wants it too, and waits: a keeps it (release_after)
        async with engine.connect() as conn:
            assert {m: o.instance for m, o in (await current_owners(conn)).items()} == {"m1": "a"}

        token = FENCE.set(held_by_a)
        try:  # a's refresh commits while a owns m1
            await persister.save("m1", pages(flavor_page("from a")), targets=targets)
        finally:
            FENCE.reset(token)
        assert not b.may_start("m1")

        # a's ownership session ends (a network cut, the server restarting it)
        work_a.pending.clear()
        async with engine.connect() as conn:
            await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'refreshd ownership a'"
                )
            )
        await wait_for(lambda: b.may_start("m1"), timeout=10, what="b to take m1 over")
        await wait_for(lambda: a.holding("m1") is None, timeout=10, what="a to drop m1")
        assert a.changes.get(("m1", "lost")) == 1

        # a refresh a began before cannot commit any more: b's newer commits win
        token = FENCE.set(held_by_a)
        try:
            with pytest.raises(OwnershipLostError):
                await persister.save("m1", pages(flavor_page("stale, from a")), targets=targets)
        finally:
            FENCE.reset(token)
        assert await flavor_name(engine) == "from a"
        token = FENCE.set(b.holding("m1"))
        try:
            await persister.save("m1", pages(flavor_page("from b")), targets=targets)
        finally:
            FENCE.reset(token)
        assert await flavor_name(engine) == "from b"

        # a has work for m1 again: b, holding it for release_after, hands it over
        work_a.pending.add("m1")
        await wait_for(lambda: a.may_start("m1"), timeout=10, what="b to hand m1 over to a")
        assert not b.may_start("m1")
        assert b.changes.get(("m1", "released")) == 1
        assert "m1" in {m for m, o in (await _owners(engine)).items() if o == "a"}
    finally:
        await a.stop()
        await b.stop()


async def _owners(engine: AsyncEngine) -> dict[str, str]:
    async with engine.connect() as conn:
        return {m: o.instance for m, o in (await current_owners(conn)).items()}


async def test_a_save_left_idle_by_a_hung_process_is_ended_by_the_server(
    engine: AsyncEngine, pg_url: str
) -> None:
    persister = Persister(engine)
    ids = {"m1": await persister.ensure_manager("m1", "awesome_cloud")}
    work = Work()
    work.pending.add("m1")
    hung_settings = OwnershipSettings(
        keepalive=0.2, session_timeout=3.0, release_after=60.0, save_idle_timeout=0.5
    )
    a = PostgresOwnership(
        normalize_url(pg_url), managers=ids, instance="a", work=work, settings=hung_settings
    )
    await a.start()
    try:
        await wait_for(lambda: a.may_start("m1"), timeout=10, what="a to own m1")
        hanging, resume = asyncio.Event(), asyncio.Event()

        async def hanging_collector() -> AsyncIterator[InventoryPage]:
            yield flavor_page("first page")
            hanging.set()
            await resume.wait()  # the process hangs with its save transaction open
            yield flavor_page("second page")

        token = FENCE.set(a.holding("m1"))
        try:
            targets = TargetCollection("m1", [Target.of("m1", "flavors", "f1")])
            save = asyncio.create_task(persister.save("m1", hanging_collector(), targets=targets))
        finally:
            FENCE.reset(token)
        await wait_for(hanging.is_set, timeout=10, what="the first page to be written")
        assert await _idle_in_transaction(engine)
        await wait_for(
            lambda: _none_idle_in_transaction(engine), timeout=10, what="the server to end it"
        )
        resume.set()
        with pytest.raises(DBAPIError):
            await save
        assert await flavor_name(engine) is None  # nothing of it was committed
    finally:
        await a.stop()


async def _idle_in_transaction(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        n = await conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle in transaction'"
            )
        )
        return bool(n.scalar())


async def _none_idle_in_transaction(engine: AsyncEngine) -> bool:
    return not await _idle_in_transaction(engine)


async def test_locks_of_another_database_on_the_same_server_are_not_this_ones(
    engine: AsyncEngine, pg_url: str
) -> None:
    """Two deployments on one PostgreSQL server have managers with the same ids; advisory
    locks are per database, and so is what one deployment reads of them."""
    other_name = f"refreshd_other_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{other_name}"')
    other_url = pg_url.rsplit("/", 1)[0] + "/" + other_name
    other = create_engine(other_url)
    try:
        await upgrade(other)
        ids = {"m1": await Persister(engine).ensure_manager("m1", "awesome_cloud")}
        other_ids = {"m1": await Persister(other).ensure_manager("m1", "awesome_cloud")}
        assert ids == other_ids  # the same manager id in both databases
        work = Work()
        here = PostgresOwnership(
            normalize_url(pg_url), managers=ids, instance="here", work=work, settings=PATIENT
        )
        await here.start()
        try:
            work.pending.add("m1")
            await wait_for(lambda: here.may_start("m1"), timeout=10, what="here to own m1")
            assert await _owners(engine) == {"m1": "here"}
            # the other deployment's manager 1 is owned by nobody, whatever its row says
            async with other.begin() as conn:
                await conn.execute(text("UPDATE managers SET owner = 'there', owner_since = now()"))
            assert await _owners(other) == {}
        finally:
            await here.stop()
    finally:
        await other.dispose()
        await _admin(f'DROP DATABASE IF EXISTS "{other_name}" WITH (FORCE)')


async def test_a_manager_taken_twice_at_once_is_still_given_back(
    engine: AsyncEngine, pg_url: str
) -> None:
    """Two askers at once in one process (the scheduler and the keepalive loop) take the
    manager once: when it is given back, another process can take it."""
    ids = {"m1": await Persister(engine).ensure_manager("m1", "awesome_cloud")}
    work_a, work_b = Work(), Work()
    a = PostgresOwnership(
        normalize_url(pg_url), managers=ids, instance="a", work=work_a, settings=FAIR
    )
    b = PostgresOwnership(
        normalize_url(pg_url), managers=ids, instance="b", work=work_b, settings=FAIR
    )
    await a.start()
    await b.start()
    try:
        entered = asyncio.Event()
        leave = asyncio.Event()

        async def asker() -> bool:
            async with a.hold("m1") as owned:
                entered.set()
                await leave.wait()
                return owned

        askers = [asyncio.create_task(asker()), asyncio.create_task(asker())]
        await wait_for(lambda: entered.is_set(), timeout=10, what="a to hold m1")
        leave.set()
        assert await asyncio.gather(*askers) == [True, True]
        assert a.changes.get(("m1", "acquired")) == 1
        # a has no work left and gives m1 back; b, which has work, takes it
        work_b.pending.add("m1")
        await wait_for(lambda: b.may_start("m1"), timeout=15, what="b to take m1")
        assert await _owners(engine) == {"m1": "b"}
    finally:
        await a.stop()
        await b.stop()
