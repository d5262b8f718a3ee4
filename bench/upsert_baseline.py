"""Raw asyncpg COPY + merge: the fastest bulk upsert this machine's PostgreSQL allows.

Prints rows/s for new rows and for unchanged rows (median of --repeat runs), so the
persister's rate (bench/full_refresh.py) can be reported as a fraction of it.

    .venv/bin/python bench/upsert_baseline.py --rows 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pg import ADMIN_DSN, temp_database

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


def records(n: int) -> list[tuple[object, ...]]:
    return [
        (f"vm-{i:07d}", f"vm {i}", "running", i % 8, json.dumps({"env": "prod", "n": i % 10}))
        for i in range(n)
    ]


async def one_pass(conn: asyncpg.Connection, rows: list[tuple[object, ...]]) -> float:
    t0 = time.perf_counter()
    async with conn.transaction():
        await conn.execute("TRUNCATE stage")
        await conn.copy_records_to_table(
            "stage", records=rows, columns=["ems_ref", "name", "state", "flavor_id", "tags"]
        )
        await conn.execute(MERGE)
    return time.perf_counter() - t0


async def measure(dsn: str, n: int, repeat: int) -> dict[str, float]:
    rows = records(n)
    new, same = [], []
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(STAGE)
        for _ in range(repeat):
            await conn.execute("DROP TABLE IF EXISTS base")
            await conn.execute(DDL)
            new.append(n / await one_pass(conn, rows))
            same.append(n / await one_pass(conn, rows))
    finally:
        await conn.close()
    return {
        "new_rows_per_s": statistics.median(new),
        "unchanged_rows_per_s": statistics.median(same),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    async with temp_database(f"bench_base_{uuid.uuid4().hex[:8]}") as dsn:
        result = await measure(dsn, args.rows, args.repeat)
    print(f"raw asyncpg COPY+merge, {args.rows} rows, median of {args.repeat}")
    print(f"  new:       {result['new_rows_per_s']:>10,.0f} rows/s")
    print(f"  unchanged: {result['unchanged_rows_per_s']:>10,.0f} rows/s")
    print(json.dumps(result | {"rows": args.rows, "admin": ADMIN_DSN}))


if __name__ == "__main__":
    asyncio.run(main())
