"""Throw-away databases for the benchmarks (PostgreSQL on the local server, SQLite files)
and what the benchmarks ask of a PostgreSQL server (version and settings, settling).

Flow: benchmark script -> **databases** -> a database URL -> wiring (engine, persister).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

HOST = os.environ.get("REFRESHD_BENCH_PG", "postgres@127.0.0.1:5432")
ADMIN_DSN = f"postgresql://{HOST}/postgres"


@asynccontextmanager
async def temp_database(name: str) -> AsyncIterator[str]:
    """Create PostgreSQL database ``name``, yield its DSN, drop it afterwards."""
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql://{HOST}/{name}"
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def bench_database(backend: str, name: str) -> AsyncIterator[str]:
    """A throw-away database URL: PostgreSQL (:func:`temp_database`) or an SQLite file."""
    if backend == "postgresql":
        async with temp_database(name) as dsn:
            yield dsn
        return
    with tempfile.TemporaryDirectory(prefix="refreshd-bench-") as tmp:
        yield f"sqlite:///{tmp}/{name}.db"


async def pg_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        v = await conn.fetchval("SHOW server_version")
        sb = await conn.fetchval("SHOW shared_buffers")
        sc = await conn.fetchval("SHOW synchronous_commit")
        return f"{v} (shared_buffers={sb}, synchronous_commit={sc})"
    finally:
        await conn.close()


async def settle(backend: str, url: str) -> str:
    """Steady state after the bulk load: what autovacuum and the checkpointer would
    reach on their own a few minutes later (PostgreSQL).  SQLite is left as the
    daemon leaves it (refreshd never runs ANALYZE there)."""
    if backend != "postgresql":
        return "no settling (SQLite: no ANALYZE, as the daemon leaves it)"
    t0 = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE")
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return f"VACUUM ANALYZE + CHECKPOINT ({time.perf_counter() - t0:.1f}s, not measured)"
