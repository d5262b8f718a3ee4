"""What the raw bulk-upsert baselines share (bench/upsert_baseline.py for PostgreSQL,
bench/sqlite_baseline.py for SQLite): the same rows, the rates kept and how they print.

Flow: full_refresh (or the baseline run alone) -> baseline.measure -> **rows, rates**.
"""

from __future__ import annotations

import json
import statistics

KINDS = ("new", "unchanged")


def records(n: int) -> list[tuple[object, ...]]:
    """``n`` rows of the baselines' 5-column table: ems_ref, name, state, flavor_id, tags."""
    return [
        (f"vm-{i:07d}", f"vm {i}", "running", i % 8, json.dumps({"env": "prod", "n": i % 10}))
        for i in range(n)
    ]


class Rates:
    """Rows/s (wall) and rows per CPU second of the passes with new and unchanged rows."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {k: [] for k in KINDS}
        self.cpu: dict[str, list[float]] = {k: [] for k in KINDS}

    def add(self, kind: str, rows: int, wall: float, cpu: float) -> None:
        self.wall[kind].append(rows / wall)
        self.cpu[kind].append(rows / cpu)

    def medians(self) -> dict[str, float]:
        return {
            "new_rows_per_s": statistics.median(self.wall["new"]),
            "unchanged_rows_per_s": statistics.median(self.wall["unchanged"]),
            "new_rows_per_cpu_s": statistics.median(self.cpu["new"]),
            "unchanged_rows_per_cpu_s": statistics.median(self.cpu["unchanged"]),
        }


def print_rates(
    title: str, result: dict[str, float], cpu_of: str, extra: dict[str, object]
) -> None:
    """A baseline run alone: its rates, then everything as one JSON line."""
    print(title)
    print(f"  new:       {result['new_rows_per_s']:>10,.0f} rows/s")
    print(f"  unchanged: {result['unchanged_rows_per_s']:>10,.0f} rows/s")
    print(
        f"  per CPU second{cpu_of}: new {result['new_rows_per_cpu_s']:,.0f}, "
        f"unchanged {result['unchanged_rows_per_cpu_s']:,.0f} rows"
    )
    print(json.dumps(result | extra))
