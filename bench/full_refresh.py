"""Full refresh of N vms on PostgreSQL or SQLite, against the simulator in a separate process.

Flow: simulator (own process) -> AwesomeConnection -> wiring (Refresher, Persister) -> database;
the passes in full_refresh_runs.py, the closing figures in full_refresh_report.py.

Measures, with the real Refresher + Persister + AwesomeConnection:

  (a) the first full refresh (empty database),
  (b) a full refresh with nothing changed (must write 0 rows),
  (c) a full refresh after --changed-pct of the vms changed (PATCH via the admin API),

each with seconds, rows written (RefreshResult), rows/s, peak RSS of this process
(psutil every 50 ms + ru_maxrss), the split collect-wait vs persist and the time
per SQL statement; then a collect-only pass (HTTP + parse, no database) and the
raw COPY+merge baseline (bench/upsert_baseline.measure; on SQLite
bench/sqlite_baseline.measure) for the ratio.  "collect hidden" compares the
collect-only time with the time the persister waited for pages: the share of
collecting that ran while the previous page was being saved.

    .venv/bin/python bench/full_refresh.py --vms 100000
    .venv/bin/python bench/full_refresh.py --vms 100000 --backend sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from databases import bench_database, pg_version
from full_refresh_report import compare_with_baseline, print_overlap, print_targets
from full_refresh_runs import Instruments, collect_only, run_refresh
from machine import code_fingerprint, machine_info, print_machine
from persister_timing import PhaseTimer, instrument_persister
from resources import BackendCpu, NoBackend, mib
from simulator import SimulatorProcess, patch_vms, simulator_process
from sql_timing import StatementTimer, enable_auto_explain
from sqlalchemy.ext.asyncio import AsyncEngine
from wiring import MANAGER, PROVIDER, wired


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--changed-pct", type=float, default=1.0)
    parser.add_argument("--baseline-repeat", type=int, default=3)
    parser.add_argument(
        "--skip-changed", action="store_true", help="only (a) and (b), for 1M vms runs"
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--collect-page-sizes",
        default="",
        help="page sizes for extra collect-only passes (tuning), e.g. 500,2000,5000",
    )
    parser.add_argument("--statements", type=int, default=14, help="top N statements to print")
    parser.add_argument("--json", help="write all figures to this file")
    parser.add_argument(
        "--explain-ms",
        type=int,
        default=0,
        help="diagnosis: print auto_explain plans of statements slower than this (slows runs)",
    )
    return parser.parse_args()


async def refreshes(
    args: argparse.Namespace, dsn: str, sim: SimulatorProcess, report: dict[str, Any]
) -> None:
    """(a) first, (b) no change, (c) --changed-pct changed: measured and printed."""
    sqlite = args.backend == "sqlite"
    timer = StatementTimer()
    phases = PhaseTimer()
    phases.attach()
    backend: BackendCpu | NoBackend = NoBackend() if sqlite else BackendCpu()
    plans: list[str] = []

    def instrument(engine: AsyncEngine) -> None:
        timer.attach(engine)
        backend.attach(engine)
        if args.explain_ms and not sqlite:
            enable_auto_explain(engine, args.explain_ms, plans)

    manager = {"provider": PROVIDER, "endpoint": sim.url, "page_size": args.page_size}
    async with wired(dsn, {MANAGER: manager}, instrument=instrument) as refreshd:
        get_timing = instrument_persister(refreshd.persister)
        m = Instruments(timer, phases, backend, get_timing, sim.pid, args.statements, plans)
        report["runs"].append(await run_refresh("a: first", refreshd.refresher, m))
        report["runs"].append(await run_refresh("b: no change", refreshd.refresher, m))
        nb = report["runs"][-1]["rows_written"]
        print(f"  -> no-change refresh wrote {nb} rows ({'OK' if nb == 0 else 'MISS: expected 0'})")
        if args.skip_changed:
            return
        step = max(1, round(100 / args.changed_pct))
        ids = [f"vm-{i:06d}" for i in range(1, args.vms + 1, step)]
        changes = {
            vm_id: {
                "state": ("stopped", "running")[k % 2],
                "tags": {"bench": "changed", "k": str(k)},
            }
            for k, vm_id in enumerate(ids)
        }
        patch_s = await patch_vms(sim.url, changes)
        print(
            f"\nchanged {len(ids):,d} vms ({100 * len(ids) / args.vms:.2f}%) "
            f"through PATCH /admin/v1/vms/{{id}} in {patch_s:.1f}s (tags + state)"
        )
        report["changed_vms"] = len(ids)
        label = f"c: {args.changed_pct:g}% changed"
        report["runs"].append(await run_refresh(label, refreshd.refresher, m))
        nc = report["runs"][-1]["written_by_collection"].get("vms", 0)
        print(
            f"  -> vms written {nc} for {len(ids)} vms changed "
            f"({'as expected' if nc == len(ids) else 'UNEXPECTED'})"
        )


async def collect_passes(args: argparse.Namespace, url: str, report: dict[str, Any]) -> None:
    sizes = [args.page_size] + [int(x) for x in args.collect_page_sizes.split(",") if x.strip()]
    report["collect_only"] = []
    print("\ncollect-only passes (HTTP + parse, no database; prefetch on):")
    for size in sizes:
        c = await collect_only(url, size)
        report["collect_only"].append(c)
        print(
            f"  page_size {size:5d}: {c['seconds']:6.2f} s  {c['rows']:,d} rows  "
            f"{c['rows_per_s']:10,.0f} rows/s  CPU {c['cpu_refreshd_s']:.2f}s  "
            f"peak RSS {mib(c['peak_rss'])}"
        )


async def main() -> None:
    args = parse_args()
    info = machine_info()
    info["code"] = code_fingerprint()
    name = f"bench_full_{uuid.uuid4().hex[:8]}"
    report: dict[str, Any] = {"args": vars(args), "machine": info, "runs": []}
    async with bench_database(args.backend, name) as dsn:
        if args.backend != "sqlite":
            info["postgresql"] = await pg_version(dsn)
        print_machine(info)
        print(
            f"\nfull refresh benchmark: {args.vms:,d} vms, page_size {args.page_size}, "
            f"{args.backend}"
        )
        async with simulator_process(args.vms, seed=args.seed) as sim:
            print(
                f"simulator pid {sim.pid} on {sim.url}: ready in {sim.ready_seconds:.1f}s, "
                f"RSS {mib(sim.rss())} (not counted below)"
            )
            await refreshes(args, dsn, sim, report)
            await collect_passes(args, sim.url, report)
        print_overlap(report)
        if not args.no_baseline:
            await compare_with_baseline(args, dsn, report)
    print_targets(args, report, info["code"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
