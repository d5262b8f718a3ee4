"""Shared by the benchmarks: a throw-away PostgreSQL database on the local server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

HOST = os.environ.get("REFRESHD_BENCH_PG", "postgres@127.0.0.1:5432")
ADMIN_DSN = f"postgresql://{HOST}/postgres"


@asynccontextmanager
async def temp_database(name: str) -> AsyncIterator[str]:
    """Create database ``name``, yield its DSN, drop it afterwards."""
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
