"""The closing figures of bench/full_refresh.py: collect/persist overlap, the ratio to the
raw baseline measured in the same run, and the targets met or missed.

Flow: full_refresh.main (runs measured) -> **report** -> printed figures (+ --json).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
from pathlib import Path
from typing import Any

from machine import code_fingerprint
from resources import mib


def print_overlap(report: dict[str, Any]) -> None:
    """How much of collecting ran while the previous page was being saved."""
    collect_s = report["collect_only"][0]["seconds"]
    print("\ncollect and persist overlap (collect-only time vs the persister's wait for pages):")
    for r in report["runs"]:
        hidden = min(r["seconds"], max(0.0, collect_s - r["collect_wait_s"]))
        r["collect_hidden_s"] = hidden
        print(
            f"  {r['label']:16s} collect {collect_s:6.2f} s, persister waited "
            f"{r['collect_wait_s']:6.2f} s -> {hidden:6.2f} s hidden "
            f"({100 * hidden / collect_s:5.1f}% of collect, "
            f"{100 * hidden / r['seconds']:5.1f}% of the refresh's wall time)"
        )


async def compare_with_baseline(args: argparse.Namespace, dsn: str, report: dict[str, Any]) -> None:
    """Measure the raw baseline of the backend now and print the persister's share of it."""
    gc.collect()
    rows = report["runs"][0]["rows_processed"]
    if args.backend == "sqlite":
        from sqlite_baseline import measure as measure_sqlite

        directory = Path(dsn.removeprefix("sqlite:///")).parent
        base = await asyncio.to_thread(measure_sqlite, directory, args.vms, args.baseline_repeat)
        what = "raw sqlite3 stage+merge baseline (bench/sqlite_baseline.measure"
    else:
        from upsert_baseline import measure

        base = await measure(dsn, args.vms, args.baseline_repeat)
        what = "raw asyncpg COPY+merge baseline (bench/upsert_baseline.measure"
    report["baseline"] = base
    first, same = report["runs"][0], report["runs"][1]
    print(f"\n{what}, {args.vms:,d} rows, median of {args.baseline_repeat}):")
    print(
        f"  new {base['new_rows_per_s']:,.0f} rows/s, unchanged "
        f"{base['unchanged_rows_per_s']:,.0f} rows/s"
    )
    r_new = first["rows_processed_per_s"] / base["new_rows_per_s"]
    r_same = same["rows_processed_per_s"] / base["unchanged_rows_per_s"]
    p_new = rows / first["persist_s"] / base["new_rows_per_s"]
    report["ratios"] = {"new": r_new, "unchanged": r_same, "new_persist_only": p_new}
    print(
        "  persister rate = inventory rows (all 7 collections) / refresh wall seconds,\n"
        "  compared with the baseline's rows/s of one 5-column table:"
    )
    print(
        f"    first refresh  {first['rows_processed_per_s']:10,.0f} rows/s = "
        f"{100 * r_new:5.1f}% of baseline new rows/s (target >= 50%)"
    )
    print(
        f"    no-change      {same['rows_processed_per_s']:10,.0f} rows/s = "
        f"{100 * r_same:5.1f}% of baseline unchanged rows/s"
    )
    print(
        f"    first refresh, persist time only (minus collect wait) "
        f"{rows / first['persist_s']:,.0f} rows/s = {100 * p_new:5.1f}% of baseline new"
    )
    # The same per CPU second, which hardly moves with the load of a shared machine:
    # persister CPU = refreshd - the collect-only pass's CPU + database backend.
    collect_cpu = report["collect_only"][0]["cpu_refreshd_s"]
    print(
        "  per CPU second (persister = refreshd CPU - collect-only CPU "
        f"{collect_cpu:.2f} s + backend CPU):"
    )
    for run, key in ((first, "new"), (same, "unchanged")):
        cpu = run["cpu_refreshd_s"] - collect_cpu + run["cpu_postgres_backend_s"]
        rate = rows / cpu
        ratio = rate / base[f"{key}_rows_per_cpu_s"]
        report["ratios"][f"{key}_cpu"] = ratio
        print(
            f"    {run['label']:16s} {rate:10,.0f} rows/CPU-s = {100 * ratio:5.1f}% of "
            f"baseline {key} {base[f'{key}_rows_per_cpu_s']:,.0f} rows/CPU-s"
        )


def print_targets(args: argparse.Namespace, report: dict[str, Any], code: str) -> None:
    """The issue's targets, met or missed; a warning when the code changed during the run."""
    b = report["runs"][1]
    print("\ntargets:")
    for run, goal in zip(report["runs"], (20, 10, 10), strict=False):
        print(
            f"  ({run['label']}) full refresh of {args.vms:,d} vms <= {goal} s: "
            f"{run['seconds']:.1f} s -> {'met' if run['seconds'] <= goal else 'MISSED'}"
        )
    peak = max(r["peak_rss"] for r in report["runs"])
    print(
        f"  peak RSS <= 300 MB: {mib(peak)} ({peak / 1e6:.0f} MB) "
        f"-> {'met' if peak <= 300e6 else 'MISSED'}"
    )
    nb = b["rows_written"]
    print(f"  no-change refresh writes 0 rows: {nb} -> {'met' if nb == 0 else 'MISSED'}")
    if len(report["runs"]) > 2:
        nc, changed = report["runs"][2]["rows_written"], report["changed_vms"]
        print(
            f"  1% changed writes exactly the changed rows: {nc} for {changed} -> "
            f"{'met' if nc == changed else 'MISSED'}"
        )
    if "ratios" in report:
        r, rc = report["ratios"]["new"], report["ratios"]["new_cpu"]
        print(
            f"  persister >= 50% of raw baseline: {100 * r:.1f}% wall, {100 * rc:.1f}% CPU -> "
            f"{'met' if r >= 0.5 else 'MISSED'} (wall), {'met' if rc >= 0.5 else 'MISSED'} (CPU)"
        )
    end_code = code_fingerprint()
    if end_code != code:
        print(f"\nWARNING: daemon/ or providers/ changed during the run: {code} -> {end_code}")
