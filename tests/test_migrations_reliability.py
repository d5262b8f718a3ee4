"""Migration 0004 (text columns, rejected_objects) on a database filled under 0001,
on SQLite and PostgreSQL:
the data stays intact, cloud values become text, ``rejected_objects`` appears, and the
downgrade gives the 0001 schema back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.persistence import schema
from daemon.persistence.db import create_engine
from daemon.persistence.migrate import alembic_config, current_revision, head_revision, upgrade
from daemon.persistence.persister import Persister
from tests.fixtures.postgres import PG_HOST, PG_PORT, PG_USER, _admin, missing_server
from tests.inventory_builders import MANAGER, Cloud, pages, snapshot

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
NAME_255 = "n" * 255


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def blank_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of its own, with no schema at all."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrate.db'}"
        return
    name = f"refreshd_migrate_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except OSError as exc:
        missing_server(f"PostgreSQL is not available: {exc}")
    yield f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def engine_0001(blank_db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(blank_db_url)
    await upgrade(engine, "0001")
    yield engine
    await engine.dispose()


async def fill_under_0001(engine: AsyncEngine) -> None:
    stamps = {"created_at": NOW, "updated_at": NOW}
    async with engine.begin() as conn:
        await conn.execute(
            schema.managers.insert().values(id=1, name=MANAGER, provider="awesome_cloud", **stamps)
        )
        await conn.execute(
            schema.flavors.insert().values(
                id=1, manager_id=1, ems_ref="f1", name="small", cpus=2, **stamps
            )
        )
        await conn.execute(
            schema.vms.insert().values(
                id=1,
                manager_id=1,
                ems_ref="v1",
                name=NAME_255,
                state="running",
                flavor_id=1,
                tags={"env": "prod"},
                **stamps,
            )
        )
        await conn.execute(
            schema.disks.insert().values(
                id=1, manager_id=1, vm_id=1, device_name="sda", size_gb=10, **stamps
            )
        )
        await conn.execute(
            schema.refresh_runs.insert().values(
                manager_id=1,
                kind="full",
                targets=1,
                created=3,
                updated=0,
                archived=0,
                deleted=0,
                started_at=NOW,
                duration=0.5,
            )
        )


async def table_rows(engine: AsyncEngine) -> dict[str, list[dict[str, Any]]]:
    """The rows of the tables 0001 has, in the columns 0001 has."""
    names = ("managers", "flavors", "vms", "disks", "refresh_runs")
    added = {"deletions_confirmed_at", "trigger", "owner", "owner_since", "owner_epoch"}
    async with engine.connect() as conn:
        out = {}
        for n in names:
            columns = [c for c in schema.metadata.tables[n].c if c.name not in added]
            out[n] = [dict(r._mapping) for r in await conn.execute(select(*columns))]
        return out


def column_types(conn: Connection) -> dict[tuple[str, str], str]:
    insp = inspect(conn)
    return {
        (t, c["name"]): str(c["type"]).upper()
        for t in ("vms", "disks", "network_ports", "images")
        for c in insp.get_columns(t)
    }


async def test_upgrade_keeps_data_and_stores_long_values(engine_0001: AsyncEngine) -> None:
    engine = engine_0001
    await fill_under_0001(engine)
    before = await table_rows(engine)

    assert await upgrade(engine) == head_revision()

    assert await table_rows(engine) == before
    async with engine.connect() as conn:
        types = await conn.run_sync(column_types)
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert (await conn.execute(text("SELECT count(*) FROM rejected_objects"))).scalar() == 0
        confirmed = await conn.execute(text("SELECT deletions_confirmed_at FROM managers"))
        assert confirmed.scalar_one() is None
    assert "rejected_objects" in tables
    if engine.dialect.name == "postgresql":
        assert types[("vms", "name")] == types[("disks", "device_name")] == "TEXT"
        assert types[("network_ports", "mac_address")] == "TEXT"

    # the persister works on the upgraded data: a 300-character name is stored
    persister = Persister(engine)
    await persister.ensure_manager(MANAGER, "awesome_cloud")
    cloud = Cloud().flavor("f1", name="small", cpus=2)
    cloud.vm("v1", name="x" * 300, state="running", image=None, disks=("sda",))
    cloud.vms["v1"]["tags"] = {"env": "prod"}
    await persister.save(MANAGER, pages(*cloud.full_pages()))
    after = await snapshot(engine)
    assert after["vms"]["v1"]["name"] == "x" * 300
    assert after["vms"]["v1"]["id"] == 1 and after["disks"][("v1", "sda")]["id"] == 1


async def test_downgrade_gives_0001_back(engine_0001: AsyncEngine) -> None:
    engine = engine_0001
    await fill_under_0001(engine)
    await upgrade(engine)
    before = await table_rows(engine)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0001"))
    assert await current_revision(engine) == "0001"
    assert await table_rows(engine) == before
    async with engine.connect() as conn:
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        types = await conn.run_sync(column_types)
        managers = await conn.run_sync(
            lambda c: {x["name"] for x in inspect(c).get_columns("managers")}
        )
    assert "rejected_objects" not in tables
    assert "deletions_confirmed_at" not in managers
    if engine.dialect.name == "postgresql":
        assert types[("vms", "name")] == "VARCHAR(255)"
