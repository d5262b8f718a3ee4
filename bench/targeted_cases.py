"""The inventories and refreshes of bench/targeted_refresh.py: one database + one embedded
cloud per inventory size, and one measured targeted refresh on a given path (default,
staged, raw floor) with its samples.

Flow: targeted_refresh.run_backend -> **one_refresh** -> Refresher (or the raw floor) -> database.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from random import Random
from typing import Any

from databases import bench_database, pg_version, settle
from persister_timing import PhaseTimer
from raw_targeted import pg_raw_refresh, sqlite_raw_refresh
from sql_timing import QueryCounter, StatementTimer
from sqlalchemy.ext.asyncio import AsyncEngine
from stats import percentile
from wiring import MANAGER, PROVIDER, wired

from daemon.model.targets import Target, TargetCollection
from daemon.persistence import schema
from daemon.persistence.persister import Persister
from daemon.persistence.settings import PersisterSettings
from daemon.pipeline.refresher import Refresher
from providers.awesome_cloud.collector import AwesomeConnection
from providers.awesome_cloud.parser import parse_vms


@dataclass
class Inventory:
    """One database + one embedded cloud of ``vms`` vms, fully refreshed once."""

    backend: str
    vms: int
    refresher: Refresher
    persister: Persister
    cloud: Any
    vm_ids: list[str]
    timer: StatementTimer
    phases: PhaseTimer
    rng: Random
    staged: Refresher
    raw: Any  # asyncpg or aiosqlite connection for the hand-written floor
    manager_id: int
    counter: QueryCounter
    sqlite_now: Any
    info: dict[str, Any] = field(default_factory=dict)
    tick: int = 0


@dataclass
class Samples:
    totals: list[float] = field(default_factory=list)
    collects: list[float] = field(default_factory=list)
    persists: list[float] = field(default_factory=list)
    written: list[tuple[int, int]] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    phase_sums: dict[str, float] = field(default_factory=dict)
    statements_last: dict[str, list[float]] = field(default_factory=dict)


async def open_inventory(
    stack: contextlib.AsyncExitStack, backend: str, vms: int, seed: int
) -> Inventory:
    url = await stack.enter_async_context(
        bench_database(backend, f"bench_tgt_{uuid.uuid4().hex[:8]}")
    )
    timer = StatementTimer()
    counter = QueryCounter()
    phases = PhaseTimer()
    phases.attach()

    def instrument(engine: AsyncEngine) -> None:
        timer.attach(engine)
        counter.attach(engine, backend)

    manager = {
        "provider": PROVIDER,
        "endpoint": "embedded",
        "embedded_vms": vms,
        "embedded_seed": seed,
        "page_size": 1000,
    }
    # "default" measures the small-batch path at any batch size (the threshold is what
    # this benchmark measures), "staged" forces the staged path
    paths = (
        PersisterSettings(small_batch_max_targets=10**9),
        PersisterSettings(small_batch_max_targets=0),
    )
    refreshd = await stack.enter_async_context(
        wired(url, {MANAGER: manager}, settings=paths, instrument=instrument)
    )
    conn: AwesomeConnection = refreshd.connection(MANAGER)
    assert conn.cloud is not None
    persister, staged = refreshd.persisters
    refresher = refreshd.refresher
    manager_id = await persister.ensure_manager(MANAGER, PROVIDER)
    await staged.ensure_manager(MANAGER, PROVIDER)
    raw: Any
    if backend == "postgresql":
        import asyncpg

        raw = await asyncpg.connect(url)
        stack.push_async_callback(raw.close)
        sqlite_now = None
    else:
        import aiosqlite

        raw = await aiosqlite.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        stack.push_async_callback(raw.close)
        await raw.execute("PRAGMA busy_timeout=30000")
        await raw.execute("PRAGMA synchronous=NORMAL")  # as the daemon (daemon/persistence/db.py)
        ts = schema.Timestamp.dialect_impl(refreshd.engine.dialect)
        sqlite_now = ts.bind_processor(refreshd.engine.dialect)
    inv = Inventory(
        backend,
        vms,
        refresher,
        persister,
        conn.cloud,
        conn.cloud.ids("vms"),
        timer,
        phases,
        Random(seed),
        refreshd.refreshers[1],
        raw,
        manager_id,
        counter,
        sqlite_now,
    )
    if backend == "postgresql":
        inv.info["server"] = await pg_version(url)
    t0 = time.perf_counter()
    full = await refresher.refresh(TargetCollection(MANAGER, [Target.full(MANAGER)]))
    inv.info["setup_full_refresh_s"] = time.perf_counter() - t0
    inv.info["setup_rows"] = full.rows_written
    inv.info["settle"] = await settle(backend, url)
    inv.info["row_counts_before"] = await persister.row_counts(MANAGER)
    print(
        f"[{backend}, {vms:,d} vms] initial full refresh: {full.rows_written:,d} rows in "
        f"{inv.info['setup_full_refresh_s']:.1f}s; then {inv.info['settle']}"
    )
    return inv


async def one_refresh(
    inv: Inventory, batch: int, path: str, samples: Samples | None, last: bool
) -> None:
    chosen = inv.rng.sample(inv.vm_ids, batch)
    inv.tick += 1
    for vm_id in chosen:
        old = inv.cloud.get("vms", vm_id)
        inv.cloud.update(
            "vms",
            vm_id,
            {
                "tags": {"bench": str(inv.tick)},
                "state": "stopped" if old["state"] == "running" else "running",
            },
        )
    if path == "raw":
        page = parse_vms([inv.cloud.get("vms", v) for v in chosen]).rows
        t0 = time.perf_counter()
        if inv.backend == "postgresql":
            await pg_raw_refresh(inv.raw, inv.manager_id, page)
        else:
            now = inv.sqlite_now(datetime.now(UTC))
            await sqlite_raw_refresh(inv.raw, inv.manager_id, page, now)
        total = time.perf_counter() - t0
        if samples is not None:
            samples.totals.append(total)
            samples.persists.append(total)
            samples.collects.append(0.0)
            samples.written.append((0, batch))
            samples.queries.append(9)  # BEGIN + 7 statements + COMMIT
        return
    refresher = inv.refresher if path == "default" else inv.staged
    targets = TargetCollection(MANAGER, [Target.of(MANAGER, "vms", v) for v in chosen])
    inv.timer.activate()
    inv.phases.activate()
    queries_before = inv.counter.count
    with inv.timer.recording() if last else contextlib.nullcontext(), inv.phases.recording():
        t0 = time.perf_counter()
        result = await refresher.refresh(targets)
        total = time.perf_counter() - t0
    if samples is None:
        return
    samples.queries.append(inv.counter.count - queries_before)
    for k, v in inv.phases.seconds.items():
        samples.phase_sums[k] = samples.phase_sums.get(k, 0.0) + v
    samples.totals.append(total)
    samples.collects.append(result.extra.get("collect_seconds", float("nan")))
    samples.persists.append(result.duration)
    samples.written.append((result.rows_written, result.counts["vms"].updated))
    if last:
        samples.statements_last = {
            k: [inv.timer.seconds[k], inv.timer.calls[k]] for k in inv.timer.seconds
        }


def summarize(batch: int, iterations: int, s: Samples, path: str) -> dict[str, Any]:
    return {
        "path": path,
        "queries_median": statistics.median(s.queries),
        "batch": batch,
        "iterations": iterations,
        "p50": percentile(s.totals, 50),
        "p99": percentile(s.totals, 99),
        "mean": statistics.fmean(s.totals),
        "collect_p50": percentile(s.collects, 50),
        "persist_p50": percentile(s.persists, 50),
        "other_p50": percentile(
            [t - c - p for t, c, p in zip(s.totals, s.collects, s.persists, strict=True)], 50
        ),
        "rows_written_median": statistics.median(w for w, _ in s.written),
        "vms_updated_min": min(v for _, v in s.written),
        "phases_mean": {k: v / iterations for k, v in s.phase_sums.items()},
        "statements_last": s.statements_last,
    }
