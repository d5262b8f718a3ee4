"""The measured passes of bench/full_refresh.py: one full refresh with its figures
(time, rows, page wait, persister phases, CPU, RSS, statements) and a collect-only pass.

Flow: full_refresh.main -> **run_refresh** -> Refresher -> collector + persister (timed).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from persister_timing import PageTiming, PhaseTimer
from resources import BackendCpu, NoBackend, RssSampler, mib, process_cpu, ru_maxrss_bytes
from sql_timing import StatementTimer
from wiring import MANAGER

from daemon.model.targets import Target, TargetCollection
from daemon.pipeline.refresher import Refresher
from providers.awesome_cloud.collector import AwesomeConnection
from providers.awesome_cloud.settings import AwesomeCloudSettings


@dataclass
class Instruments:
    """What measures a refresh of bench/full_refresh.py."""

    timer: StatementTimer
    phases: PhaseTimer
    backend: BackendCpu | NoBackend
    get_timing: Callable[[], PageTiming]
    sim_pid: int
    show_statements: int
    plans: list[str]
    """auto_explain plans of slow statements (--explain-ms), printed after each refresh."""


async def run_refresh(label: str, refresher: Refresher, m: Instruments) -> dict[str, Any]:
    gc.collect()
    cpu0, sim0, pg0 = process_cpu(), process_cpu(m.sim_pid), m.backend.seconds()
    async with RssSampler(0.05) as rss:
        with m.timer.recording(), m.phases.recording():
            t0 = time.perf_counter()
            result = await refresher.refresh(TargetCollection(MANAGER, [Target.full(MANAGER)]))
            seconds = time.perf_counter() - t0
    cpu1, sim1, pg1 = process_cpu(), process_cpu(m.sim_pid), m.backend.seconds()
    timing = m.get_timing()
    timer, phases = m.timer, m.phases
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
    if m.show_statements:
        print("  time per statement (wall, inside the refresh; COPY = stage load):")
        for line in timer.report(seconds, top=m.show_statements):
            print(line)
    _print_plans(m.plans)
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
