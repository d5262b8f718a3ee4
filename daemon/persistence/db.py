"""Database engines: PostgreSQL (asyncpg) in production, SQLite (aiosqlite) embedded.

Flow: ... -> persister -> **engine** -> tables.

One place decides how refreshd talks to its database: the URL is normalised
(``postgresql://`` becomes ``postgresql+asyncpg://``), JSON is written in one
canonical form (sorted keys) so that "did this row change" can be answered by
comparing values in SQL, and SQLite gets WAL mode and a busy timeout.
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_

from daemon.persistence.canonical_json import canonical_json

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./refreshd.db"

__all__ = ["DEFAULT_DATABASE_URL", "Dialect", "canonical_json", "create_engine", "dialect_of"]


class Dialect(enum.Enum):
    POSTGRESQL = "postgresql"
    SQLITE = "sqlite"


class DatabaseURLError(ValueError):
    pass


def normalize_url(url: str) -> URL:
    """Accept the URLs operators write and pick refreshd's async drivers."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises several types here
        raise DatabaseURLError(f"invalid database URL {url!r}: {exc}") from None
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg")
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    raise DatabaseURLError(
        f"unsupported database {backend!r} in {parsed.render_as_string(hide_password=True)}; "
        "use postgresql://... or sqlite:///path"
    )


def dialect_of(engine: AsyncEngine) -> Dialect:
    return Dialect(engine.dialect.name)


def create_engine(url: str, *, echo: bool = False, pool_size: int = 5) -> AsyncEngine:
    """An engine for ``url`` with refreshd's settings (no I/O happens here)."""
    parsed = normalize_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "json_serializer": canonical_json}
    if parsed.get_backend_name() == "postgresql":
        # SQLAlchemy's pre-ping is three round trips on asyncpg: ours is one
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False)
        engine = create_async_engine(parsed, **kwargs)
        event.listen(engine.sync_engine, "checkout", _pg_on_checkout)
    else:
        kwargs["pool_pre_ping"] = True
        kwargs["connect_args"] = {"timeout": 30}
        engine = create_async_engine(parsed, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    return engine


def _pg_on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Ping a pooled PostgreSQL connection at checkout in ONE round trip.

    SQLAlchemy's ``pool_pre_ping`` costs three round trips per checkout on asyncpg
    (``BEGIN``, ``;``, ``ROLLBACK``), a fifth of the CPU of a one-vm targeted refresh
    (bench/RESULTS.md, 2026-12-02).  This sends one simple ``SELECT 1`` instead; a
    connection that fails it (closed by a restart, ``pg_terminate_backend``, an idle
    timeout) raises ``DisconnectionError``, so the pool discards it and connects afresh.
    """
    driver = dbapi_connection.driver_connection
    try:
        await_(driver.execute("SELECT 1"))
    except Exception as error:
        raise exc.DisconnectionError(f"PostgreSQL connection failed its ping: {error}") from error


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()
