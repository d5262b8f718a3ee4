"""PostgreSQL pooled connections: one the server closed is replaced at checkout.

The engine does not pre-ping (three round trips per checkout on asyncpg); a
connection the server ended (restart, ``pg_terminate_backend``, idle timeout)
must still never reach a refresh.
"""

from __future__ import annotations

import asyncpg
import pytest

from daemon.persistence.db import create_engine
from daemon.persistence.migrate import upgrade
from daemon.persistence.persister import Persister
from tests.inventory_builders import Cloud, pages, snapshot, until, vm_targets


@pytest.mark.postgres
async def test_a_connection_the_server_closed_is_replaced_at_checkout(pg_url: str) -> None:
    engine = create_engine(pg_url, pool_size=1)
    admin = await asyncpg.connect(pg_url)
    try:
        await upgrade(engine)
        persister = Persister(engine)
        mid = await persister.ensure_manager("m1", "awesome_cloud")
        cloud = Cloud().flavor("f1").image("img1").vm("a")
        await persister.save("m1", pages(*cloud.full_pages()))
        async with engine.connect() as conn:
            pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()

        await admin.execute("SELECT pg_terminate_backend($1)", pid)

        async def gone() -> bool:
            n = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
            return n == 0

        await until(gone)
        cloud.vms["a"]["name"] = "renamed"
        result = await persister.save(
            "m1", pages(cloud.targeted_page("a")), targets=vm_targets("a")
        )
        assert result.counts["vms"].updated == 1
        assert (await snapshot(engine, mid))["vms"]["a"]["name"] == "renamed"
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        await admin.close()
        await engine.dispose()
