"""Full refresh of N vms on PostgreSQL or SQLite, against the simulator in a separate process.

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
import gc
import json
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    MANAGER,
    PROVIDER,
    BackendCpu,
    PhaseTimer,
    RssSampler,
    StatementTimer,
    code_fingerprint,
    enable_auto_explain,
    instrument_persister,
    machine_info,
    mib,
    patch_vms,
    pg_version,
    print_machine,
    process_cpu,
    ru_maxrss_bytes,
    simulator_process,
)
from pg import temp_database

from daemon.model.targets import Target, TargetCollection
from daemon.persistence.db import create_engine
from daemon.persistence.migrate import upgrade
from daemon.persistence.persister import Persister
from daemon.pipeline.refresher import RefreshableManager, Refresher
from providers.awesome_cloud.collector import AwesomeConnection
from providers.awesome_cloud.settings import AwesomeCloudSettings


async def run_refresh(
    label: str,
    refresher: Refresher,
    get_timing: Any,
    timer: StatementTimer,
    phases: PhaseTimer,
    backend: BackendCpu | NoBackend,
    sim_pid: int,
    *,
    show_statements: int,
) -> dict[str, Any]:
    gc.collect()
    cpu0, sim0, pg0 = process_cpu(), process_cpu(sim_pid), backend.seconds()
    async with RssSampler(0.05) as rss:
        with timer.recording(), phases.recording():
            t0 = time.perf_counter()
            result = await refresher.refresh(TargetCollection(MANAGER, [Target.full(MANAGER)]))
            seconds = time.perf_counter() - t0
    cpu1, sim1, pg1 = process_cpu(), process_cpu(sim_pid), backend.seconds()
    timing = get_timing()
    total = result.total
    out = {
        "label": label,
        "seconds": seconds,
        "persister_duration": result.duration,
        "pages": timing.pages,
        "rows_processed": timing.rows,
        "rows_by_collection": dict(timing.rows_by_collection),
        "rows_written": result.rows_written,
        "created": total.created,
        "updated": total.updated,
        "archived": total.archived,
        "deleted": total.deleted,
        "written_by_collection": {k: v.written for k, v in result.counts.items() if v.written},
        "rows_processed_per_s": timing.rows / seconds,
        "rows_written_per_s": result.rows_written / seconds,
        "collect_wait_s": timing.wait,
        "persist_s": seconds - timing.wait,
        "peak_rss": rss.peak,
        "start_rss": rss.start_rss,
        "ru_maxrss_after": ru_maxrss_bytes(),
        "cpu_refreshd_s": cpu1 - cpu0,
        "cpu_simulator_s": sim1 - sim0,
        "cpu_postgres_backend_s": pg1 - pg0,
        "statements": {k: [timer.seconds[k], timer.calls[k]] for k in timer.seconds},
        "phases": dict(phases.seconds),
    }
    print(f"\n({label}) full refresh")
    print(f"  seconds            {seconds:10.2f}")
    print(
        f"  rows processed     {timing.rows:10,d}   {timing.rows / seconds:10,.0f} rows/s  "
        f"({timing.pages} pages)  {dict(timing.rows_by_collection)}"
    )
    print(
        f"  rows written       {result.rows_written:10,d}   "
        f"{result.rows_written / seconds:10,.0f} rows/s  ({total})"
    )
    if out["written_by_collection"]:
        print(f"    by collection    {out['written_by_collection']}")
    print(
        f"  split              persister waiting for pages (collect not hidden by prefetch) "
        f"{timing.wait:6.2f} s ({100 * timing.wait / seconds:4.1f}%), "
        f"persisting {seconds - timing.wait:6.2f} s "
        f"({100 * (seconds - timing.wait) / seconds:4.1f}%)"
    )
    print(
        "  persister phases   "
        + "  ".join(
            f"{k} {v:.2f}" for k, v in sorted(phases.seconds.items(), key=lambda kv: -kv[1])
        )
    )
    print(
        f"  CPU seconds        refreshd {cpu1 - cpu0:6.2f}  postgres backend {pg1 - pg0:6.2f}  "
        f"simulator {sim1 - sim0:6.2f}  (wall {seconds:.2f}; refreshd+backend "
        f"{cpu1 - cpu0 + pg1 - pg0:.2f} = what the refresh would take alone, roughly)"
    )
    print(
        f"  peak RSS           {mib(rss.peak)} (psutil, 50 ms; start {mib(rss.start_rss)}); "
        f"ru_maxrss so far {mib(ru_maxrss_bytes())}"
    )
    if show_statements:
        print("  time per statement (wall, inside the refresh; COPY = stage load):")
        for line in timer.report(seconds, top=show_statements):
            print(line)
    return out


def _print_plans(plans: list[str]) -> None:
    if plans:
        print(f"  auto_explain: {len(plans)} slow statement(s):")
        for plan in plans:
            print("    " + plan.replace("\n", "\n    "))
        plans.clear()


async def collect_only(url: str, page_size: int) -> dict[str, Any]:
    """HTTP + parse of every page, no database (the collector's own prefetch on)."""
    settings = AwesomeCloudSettings(endpoint=url, page_size=page_size)
    gc.collect()
    cpu0 = process_cpu()
    async with AwesomeConnection(MANAGER, settings) as conn, RssSampler() as rss:
        t0 = time.perf_counter()
        rows = pages = 0
        async for page in conn.collect_full():
            rows += len(page)
            pages += 1
        seconds = time.perf_counter() - t0
    return {
        "page_size": page_size,
        "seconds": seconds,
        "rows": rows,
        "pages": pages,
        "rows_per_s": rows / seconds,
        "cpu_refreshd_s": process_cpu() - cpu0,
        "peak_rss": rss.peak,
    }


@asynccontextmanager
async def bench_database(backend: str, name: str) -> AsyncIterator[str]:
    """A throw-away database URL: PostgreSQL (bench/pg.py) or an SQLite file."""
    if backend == "postgresql":
        async with temp_database(name) as dsn:
            yield dsn
        return
    with tempfile.TemporaryDirectory(prefix="refreshd-bench-") as tmp:
        yield f"sqlite:///{tmp}/{name}.db"


class NoBackend:
    """SQLite runs in this process: its CPU is in the refreshd column."""

    def attach(self, engine: Any) -> None:
        pass

    def seconds(self) -> float:
        return 0.0


async def main() -> None:
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
    args = parser.parse_args()

    info = machine_info()
    info["code"] = code_fingerprint()
    name = f"bench_full_{uuid.uuid4().hex[:8]}"
    report: dict[str, Any] = {"args": vars(args), "machine": info, "runs": []}
    sqlite = args.backend == "sqlite"
    async with bench_database(args.backend, name) as dsn:
        if not sqlite:
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
            engine = create_engine(dsn)
            timer = StatementTimer()
            timer.attach(engine)
            phases = PhaseTimer()
            phases.attach()
            backend: BackendCpu | NoBackend = NoBackend() if sqlite else BackendCpu()
            backend.attach(engine)
            plans: list[str] = []
            if args.explain_ms and not sqlite:
                enable_auto_explain(engine, args.explain_ms, plans)
            try:
                await upgrade(engine)
                persister = Persister(engine)
                get_timing = instrument_persister(persister)
                settings = AwesomeCloudSettings(endpoint=sim.url, page_size=args.page_size)
                async with AwesomeConnection(MANAGER, settings) as conn:
                    refresher = Refresher(
                        persister, {MANAGER: RefreshableManager(MANAGER, PROVIDER, conn)}
                    )
                    run = lambda label: run_refresh(  # noqa: E731
                        label,
                        refresher,
                        get_timing,
                        timer,
                        phases,
                        backend,
                        sim.pid,
                        show_statements=args.statements,
                    )
                    report["runs"].append(await run("a: first"))
                    _print_plans(plans)
                    report["runs"].append(await run("b: no change"))
                    _print_plans(plans)
                    nb = report["runs"][-1]["rows_written"]
                    print(
                        f"  -> no-change refresh wrote {nb} rows "
                        f"({'OK' if nb == 0 else 'MISS: expected 0'})"
                    )

                    if not args.skip_changed:
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
                        report["runs"].append(await run(f"c: {args.changed_pct:g}% changed"))
                        _print_plans(plans)
                        nc = report["runs"][-1]["written_by_collection"].get("vms", 0)
                        print(
                            f"  -> vms written {nc} for {len(ids)} vms changed "
                            f"({'as expected' if nc == len(ids) else 'UNEXPECTED'})"
                        )

                sizes = [args.page_size] + [
                    int(x) for x in args.collect_page_sizes.split(",") if x.strip()
                ]
                report["collect_only"] = []
                print("\ncollect-only passes (HTTP + parse, no database; prefetch on):")
                for size in sizes:
                    c = await collect_only(sim.url, size)
                    report["collect_only"].append(c)
                    print(
                        f"  page_size {size:5d}: {c['seconds']:6.2f} s  {c['rows']:,d} rows  "
                        f"{c['rows_per_s']:10,.0f} rows/s  CPU {c['cpu_refreshd_s']:.2f}s  "
                        f"peak RSS {mib(c['peak_rss'])}"
                    )
            finally:
                await engine.dispose()

        collect_s = report["collect_only"][0]["seconds"]
        print(
            "\ncollect and persist overlap (collect-only time vs the persister's wait for pages):"
        )
        for r in report["runs"]:
            hidden = min(r["seconds"], max(0.0, collect_s - r["collect_wait_s"]))
            r["collect_hidden_s"] = hidden
            print(
                f"  {r['label']:16s} collect {collect_s:6.2f} s, persister waited "
                f"{r['collect_wait_s']:6.2f} s -> {hidden:6.2f} s hidden "
                f"({100 * hidden / collect_s:5.1f}% of collect, "
                f"{100 * hidden / r['seconds']:5.1f}% of the refresh's wall time)"
            )

        if not args.no_baseline:
            gc.collect()
            rows = report["runs"][0]["rows_processed"]
            if sqlite:
                from sqlite_baseline import measure as measure_sqlite

                directory = Path(dsn.removeprefix("sqlite:///")).parent
                base = await asyncio.to_thread(
                    measure_sqlite, directory, args.vms, args.baseline_repeat
                )
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
    if end_code != info["code"]:
        print(
            f"\nWARNING: daemon/ or providers/ changed during the run: {info['code']} -> {end_code}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
