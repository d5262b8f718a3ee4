"""Schema migrations: bring the database to the schema this code expects.

Flow: start-up -> **migrate** -> persister.

``upgrade`` applies the Alembic migrations shipped in ``daemon/persistence/migrations``
(serialized across processes on PostgreSQL by an advisory lock, so several
daemons starting together do not race); ``current_revision`` and
``head_revision`` let readiness checks and the CLI tell whether the schema is
up to date.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATION_LOCK = 0x52464845  # "RFHE"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _upgrade(connection: Connection, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
    command.upgrade(alembic_config(connection), revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> str | None:
    """Apply migrations up to ``revision``; returns the revision now current."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, revision)
    return await current_revision(engine)


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)
