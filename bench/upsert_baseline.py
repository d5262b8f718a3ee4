"""Raw asyncpg COPY + merge: the fastest bulk upsert this machine's PostgreSQL allows.

Flow: baseline_rows.records -> asyncpg COPY + merge -> rates (full_refresh_report).

Prints rows/s for new rows and for unchanged rows (median of --repeat runs), so the
persister's rate (bench/full_refresh.py) can be reported as a fraction of it.

    .venv/bin/python bench/upsert_baseline.py --rows 100000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_rows import KINDS, Rates, print_rates, records
from databases import ADMIN_DSN, temp_database

DDL = """
CREATE TABLE base (
    id bigserial PRIMARY KEY, manager_id bigint NOT NULL, ems_ref text NOT NULL,
    name text, state text, flavor_id bigint, tags jsonb,
    created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
    UNIQUE (manager_id, ems_ref))
"""
STAGE = (
    "CREATE TEMP TABLE stage (ems_ref text, name text, state text, flavor_id bigint, tags jsonb)"
)
MERGE = """
INSERT INTO base (manager_id, ems_ref, name, state, flavor_id, tags, created_at, updated_at)
SELECT 1, ems_ref, name, state, flavor_id, tags, now(), now() FROM stage
ON CONFLICT (manager_id, ems_ref) DO UPDATE SET
  name = excluded.name, state = excluded.state, flavor_id = excluded.flavor_id,
  tags = excluded.tags, updated_at = excluded.updated_at
WHERE (base.name, base.state, base.flavor_id, base.tags)
  IS DISTINCT FROM (excluded.name, excluded.state, excluded.flavor_id, excluded.tags)
"""


def _cpu(pid: int) -> float:
    """CPU seconds of this process plus those of the PostgreSQL backend ``pid``."""
    t = psutil.Process(pid).cpu_times()
    return time.process_time() + t.user + t.system


async def one_pass(
    conn: asyncpg.Connection, rows: list[tuple[object, ...]], backend: int
) -> tuple[float, float]:
    """Wall and CPU (client + backend) seconds of one stage + merge transaction."""
    t0, c0 = time.perf_counter(), _cpu(backend)
    async with conn.transaction():
        await conn.execute("TRUNCATE stage")
        await conn.copy_records_to_table(
            "stage", records=rows, columns=["ems_ref", "name", "state", "flavor_id", "tags"]
        )
        await conn.execute(MERGE)
    return time.perf_counter() - t0, _cpu(backend) - c0


async def measure(dsn: str, n: int, repeat: int) -> dict[str, float]:
    """Rows/s (wall) and rows per CPU second (client + backend), median of ``repeat``.

    The CPU rates hardly move with the load of a shared machine; compare with them.
    """
    rows = records(n)
    rates = Rates()
    conn = await asyncpg.connect(dsn)
    try:
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute(STAGE)
        for _ in range(repeat):
            await conn.execute("DROP TABLE IF EXISTS base")
            await conn.execute(DDL)
            for kind in KINDS:
                rates.add(kind, n, *await one_pass(conn, rows, backend))
    finally:
        await conn.close()
    return rates.medians()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    async with temp_database(f"bench_base_{uuid.uuid4().hex[:8]}") as dsn:
        result = await measure(dsn, args.rows, args.repeat)
    print_rates(
        f"raw asyncpg COPY+merge, {args.rows} rows, median of {args.repeat}",
        result,
        " (client + backend)",
        {"rows": args.rows, "admin": ADMIN_DSN},
    )


if __name__ == "__main__":
    asyncio.run(main())
