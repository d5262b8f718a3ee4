"""Raw sqlite3 stage + merge: the fastest bulk upsert this machine's SQLite allows.

Flow: baseline_rows.records -> sqlite3 executemany + merge -> rates (full_refresh_report).

The SQLite counterpart of bench/upsert_baseline.py (same table, same rows): one
``executemany`` into a temporary stage table, then one ``INSERT ... SELECT ... ON
CONFLICT DO UPDATE ... WHERE`` changed, one transaction, WAL and
``synchronous=NORMAL`` as refreshd sets them.  Prints rows/s for new rows and for
unchanged rows (median of --repeat runs), so the persister's SQLite rate
(``bench/full_refresh.py --backend sqlite``) can be reported as a fraction of it.

    .venv/bin/python bench/sqlite_baseline.py --rows 100000
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_rows import KINDS, Rates, print_rates, records

DDL = """
CREATE TABLE base (
    id INTEGER PRIMARY KEY, manager_id INTEGER NOT NULL, ems_ref TEXT NOT NULL,
    name TEXT, state TEXT, flavor_id INTEGER, tags TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    UNIQUE (manager_id, ems_ref))
"""
STAGE = (
    "CREATE TEMP TABLE stage (ems_ref TEXT, name TEXT, state TEXT, flavor_id INTEGER, tags TEXT)"
)
MERGE = """
INSERT INTO base (manager_id, ems_ref, name, state, flavor_id, tags, created_at, updated_at)
SELECT 1, ems_ref, name, state, flavor_id, tags, :now, :now FROM stage WHERE true
ON CONFLICT (manager_id, ems_ref) DO UPDATE SET
  name = excluded.name, state = excluded.state, flavor_id = excluded.flavor_id,
  tags = excluded.tags, updated_at = excluded.updated_at
WHERE (base.name, base.state, base.flavor_id, base.tags)
  IS NOT (excluded.name, excluded.state, excluded.flavor_id, excluded.tags)
"""


def one_pass(conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> tuple[float, float]:
    """Wall and CPU seconds (this thread: SQLite runs in it) of one stage + merge."""
    t0, c0 = time.perf_counter(), time.thread_time()
    with conn:  # one transaction
        conn.execute("DELETE FROM stage")
        conn.executemany("INSERT INTO stage VALUES (?, ?, ?, ?, ?)", rows)
        conn.execute(MERGE, {"now": "2026-12-02T00:00:00+00:00"})
    return time.perf_counter() - t0, time.thread_time() - c0


def measure(directory: Path, n: int, repeat: int) -> dict[str, float]:
    """New and unchanged rows/s of the raw merge, median of ``repeat`` fresh databases."""
    rows = records(n)
    rates = Rates()
    for i in range(repeat):
        path = directory / f"sqlite_baseline_{i}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(DDL)
            conn.execute(STAGE)
            conn.isolation_level = ""  # `with conn` opens a transaction again
            for kind in KINDS:
                rates.add(kind, n, *one_pass(conn, rows))
        finally:
            conn.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    return rates.medians()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.rows, args.repeat)
    print_rates(
        f"raw sqlite3 stage + merge, {args.rows} rows, median of {args.repeat}",
        result,
        "",
        {"rows": args.rows},
    )


if __name__ == "__main__":
    main()
