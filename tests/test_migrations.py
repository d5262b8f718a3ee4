"""Schema migrations: a database filled under an older revision upgrades with its data intact.

On SQLite and PostgreSQL (each test gets a database of its own: it starts below head).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.persistence import schema
from daemon.persistence.db import create_engine
from daemon.persistence.migrate import alembic_config, current_revision, head_revision, upgrade
from daemon.persistence.persister import Persister
from tests.fixtures.postgres import ADMIN_DSN, PG_HOST, PG_PORT, PG_USER, missing_server
from tests.inventory_builders import MANAGER, Cloud, normalize, pages, snapshot

CHILDREN = ("disks", "network_ports", "vm_security_groups")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def fresh_engine(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    """An engine on a database with no schema at all."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
        yield engine
        await engine.dispose()
        return
    name = f"refreshd_migr_{uuid.uuid4().hex[:10]}"
    try:
        admin = await asyncpg.connect(ADMIN_DSN, timeout=5)
    except OSError as exc:
        missing_server(f"PostgreSQL on {PG_HOST}:{PG_PORT} is not available: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        engine = create_engine(f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}")
        try:
            yield engine
        finally:
            await engine.dispose()
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _manager_id_foreign_keys(conn: Connection) -> dict[str, bool]:
    insp = inspect(conn)
    return {
        table: any(
            fk["constrained_columns"] == ["manager_id"] for fk in insp.get_foreign_keys(table)
        )
        for table in (*CHILDREN, "vms", "refresh_runs")
    }


def _schema_differences(conn: Connection) -> list[object]:
    diffs = list(compare_metadata(MigrationContext.configure(conn), schema.metadata))
    if conn.dialect.name == "sqlite":
        # migration 0004 turns varchar(n) into text on PostgreSQL only: SQLite never
        # enforced the lengths, and retyping a column there means rebuilding its table
        diffs = [d for d in diffs if not _is_varchar_to_text(d)]
    return diffs


def _is_varchar_to_text(diff: object) -> bool:
    if not isinstance(diff, list) or len(diff) != 1:
        return False
    change = diff[0]
    return (
        change[0] == "modify_type"
        and isinstance(change[5], sa.String)
        and isinstance(change[6], sa.Text)
    )


def _downgrade(conn: Connection, revision: str) -> None:
    command.downgrade(alembic_config(conn), revision)


def inventory() -> Cloud:
    cloud = Cloud().flavor("f1").image("img1").security_group("sg1")
    cloud.vm("a", disks=("sda", "sdb"), ports=("p1",), sgs=("sg1",), tags={"env": "é"})
    cloud.vm("b", disks=("sda",), ports=("p1", "p2"), sgs=("sg1",))
    return cloud


async def test_database_filled_under_0001_upgrades_with_data_intact(
    fresh_engine: AsyncEngine,
) -> None:
    engine = fresh_engine
    # the inventory is written by today's persister, then the schema is taken back to
    # 0001 (the rows stay: test_head_downgrades_to_0001_with_data_intact); a database
    # filled by 0001's own code is tests/test_migrations_reliability.py's
    await upgrade(engine)
    persister = Persister(engine)
    await persister.ensure_manager(MANAGER, "awesome_cloud")
    cloud = inventory()
    await persister.save(MANAGER, pages(*cloud.full_pages()))
    cloud.remove_vm("b")
    await persister.save(MANAGER, pages(*cloud.full_pages()))  # b archived, its children gone
    async with engine.begin() as conn:
        await conn.run_sync(_downgrade, "0001")
    assert await current_revision(engine) == "0001"
    before = await snapshot(engine)
    async with engine.connect() as conn:
        assert (await conn.run_sync(_manager_id_foreign_keys))["disks"]

    assert await upgrade(engine) == head_revision()

    assert await snapshot(engine) == before
    async with engine.connect() as conn:
        fks = await conn.run_sync(_manager_id_foreign_keys)
        assert fks == {t: t not in CHILDREN for t in fks}
        # the migrations build exactly the tables daemon.persistence.schema declares
        assert await conn.run_sync(_schema_differences) == []
    # the upgraded database keeps working: nothing changed is nothing written
    cloud.vm("b", disks=("sda",))
    result = await persister.save(MANAGER, pages(*cloud.full_pages()))
    assert result.details() == {"vms": {"updated": 1}, "disks": {"created": 1}}
    assert normalize(await snapshot(engine)) == cloud.normalized()


async def test_head_downgrades_to_0001_with_data_intact(fresh_engine: AsyncEngine) -> None:
    engine = fresh_engine
    await upgrade(engine)
    persister = Persister(engine)
    await persister.ensure_manager(MANAGER, "awesome_cloud")
    await persister.save(MANAGER, pages(*inventory().full_pages()))
    before = await snapshot(engine)

    async with engine.begin() as conn:
        await conn.run_sync(_downgrade, "0001")

    assert await current_revision(engine) == "0001"
    assert await snapshot(engine) == before
    async with engine.connect() as conn:
        assert all((await conn.run_sync(_manager_id_foreign_keys)).values())
