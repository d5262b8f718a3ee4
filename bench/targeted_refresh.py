"""Targeted refresh latency: 1 vm and 100 vms, with 1k and 100k vms in the database.

Real Refresher + Persister + AwesomeConnection with the simulator embedded in this
process (``endpoint = "embedded"``).  Before each refresh the targeted vms are
changed in the cloud (new tags, state flipped), so every refresh writes rows.

The machine is shared and noisy, so for each backend both inventories are set up
side by side (one database and one embedded cloud each) and their refreshes are
*interleaved* (1k, 100k, 100k, 1k, ...): both sizes see the same noise, and the
ratio 100k/1k is meaningful even when absolute figures drift.

Three ways of saving are interleaved per inventory, each on fresh random vms:

* ``default``: the daemon as configured (targeted batches of at most
  ``PersisterSettings.small_batch_max_targets`` take the small-batch path);
* ``staged``: the daemon with every refresh forced through the staged path
  (temp tables + COPY), the path before the small-batch one existed;
* ``raw``: the floor, a hand-written transaction doing the same writes for the
  same kind of vms (bench/raw_targeted.py), persist only (no collect).

Prints p50/p99 per case, the split collect (HTTP + parse) vs persist, queries
(PostgreSQL: asyncpg queries, each at least one round trip; SQLite: statements
run) per refresh, the ratios to the raw floor and the ratio 100k/1k.

    .venv/bin/python bench/targeted_refresh.py                 # PostgreSQL and SQLite
    .venv/bin/python bench/targeted_refresh.py --backends postgresql --inventories 1000,10000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    MANAGER,
    PROVIDER,
    PhaseTimer,
    StatementTimer,
    code_fingerprint,
    machine_info,
    percentile,
    pg_version,
    print_machine,
)
from pg import temp_database
from raw_targeted import pg_raw_refresh, sqlite_raw_refresh

from daemon.model.targets import Target, TargetCollection
from daemon.persistence import schema
from daemon.persistence.db import create_engine
from daemon.persistence.migrate import upgrade
from daemon.persistence.persister import Persister
from daemon.persistence.settings import PersisterSettings
from daemon.pipeline.refresher import RefreshableManager, Refresher
from providers.awesome_cloud.collector import AwesomeConnection
from providers.awesome_cloud.parser import parse_vms
from providers.awesome_cloud.settings import AwesomeCloudSettings

WARMUP = 5
PATHS = ("default", "staged", "raw")


class QueryCounter:
    """Queries sent to the database by this process's engine connections.

    PostgreSQL: asyncpg's query logger (each query is at least one round trip; a
    multi-statement simple query is one).  SQLite: the sqlite3 trace callback
    (statements run; each is one hop to aiosqlite's thread or fewer).
    """

    def __init__(self) -> None:
        self.count = 0

    def _hit(self, *_: Any) -> None:
        self.count += 1

    def attach(self, engine: Any, backend: str) -> None:
        from sqlalchemy import event
        from sqlalchemy.util import await_

        @event.listens_for(engine.sync_engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            driver = dbapi_connection.driver_connection
            if backend == "postgresql":
                driver.add_query_logger(self._hit)
            else:
                await_(driver.set_trace_callback(self._hit))


@contextlib.asynccontextmanager
async def database(backend: str) -> AsyncIterator[str]:
    if backend == "postgresql":
        async with temp_database(f"bench_tgt_{uuid.uuid4().hex[:8]}") as dsn:
            yield dsn
    else:
        with tempfile.TemporaryDirectory(prefix="refreshd-bench-") as d:
            yield f"sqlite:///{d}/bench.db"


async def settle(backend: str, url: str) -> str:
    """Steady state after the bulk load: what autovacuum and the checkpointer would
    reach on their own a few minutes later (PostgreSQL).  SQLite is left as the
    daemon leaves it (refreshd never runs ANALYZE there)."""
    if backend != "postgresql":
        return "no settling (SQLite: no ANALYZE, as the daemon leaves it)"
    import asyncpg

    t0 = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE")
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return f"VACUUM ANALYZE + CHECKPOINT ({time.perf_counter() - t0:.1f}s, not measured)"


def ms(s: float) -> str:
    return f"{1000 * s:8.2f}"


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
    url = await stack.enter_async_context(database(backend))
    engine = create_engine(url)
    stack.push_async_callback(engine.dispose)
    timer = StatementTimer()
    timer.attach(engine)
    counter = QueryCounter()
    counter.attach(engine, backend)
    phases = PhaseTimer()
    phases.attach()
    await upgrade(engine)
    # "default" measures the small-batch path at any batch size (the threshold is what
    # this benchmark measures), "staged" forces the staged path
    persister = Persister(engine, settings=PersisterSettings(small_batch_max_targets=10**9))
    staged = Persister(engine, settings=PersisterSettings(small_batch_max_targets=0))
    settings = AwesomeCloudSettings(
        endpoint="embedded", embedded_vms=vms, embedded_seed=seed, page_size=1000
    )
    conn = await stack.enter_async_context(AwesomeConnection(MANAGER, settings))
    assert conn.cloud is not None
    managers = {MANAGER: RefreshableManager(MANAGER, PROVIDER, conn)}
    refresher = Refresher(persister, managers)
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
        ts = schema.Timestamp.dialect_impl(engine.dialect)
        sqlite_now = ts.bind_processor(engine.dialect)
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
        Refresher(staged, managers),
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
            from datetime import UTC, datetime

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


async def run_backend(
    backend: str, sizes: list[int], cases: list[tuple[int, int]], seed: int
) -> list[dict[str, Any]]:
    async with contextlib.AsyncExitStack() as stack:
        invs = [await open_inventory(stack, backend, vms, seed) for vms in sizes]
        out = [{"backend": backend, "vms": inv.vms, **inv.info, "cases": []} for inv in invs]
        for batch, iterations in cases:
            gc.collect()
            samples = [{p: Samples() for p in PATHS} for _ in invs]
            for i in range(WARMUP + iterations):
                order = [(k, p) for k in range(len(invs)) for p in PATHS]
                if i % 2:
                    order.reverse()
                for k, path in order:
                    measuring = i >= WARMUP
                    await one_refresh(
                        invs[k],
                        batch,
                        path,
                        samples[k][path] if measuring else None,
                        last=i == WARMUP + iterations - 1,
                    )
            for inv, per_path, o in zip(invs, samples, out, strict=True):
                raw = summarize(batch, iterations, per_path["raw"], "raw")
                for path in PATHS:
                    r = summarize(batch, iterations, per_path[path], path)
                    o["cases"].append(r)
                    print(
                        f"  {backend:<10} {inv.vms:>7,d} vms {batch:3d} vm(s) x {iterations} "
                        f"{path:<7}: p50 {ms(r['p50'])} ms  p99 {ms(r['p99'])} ms | collect "
                        f"{ms(r['collect_p50'])}  persist {ms(r['persist_p50'])} | "
                        f"{r['queries_median']:.0f} queries | p50/raw "
                        f"{r['p50'] / raw['p50']:.2f}, persist/raw "
                        f"{r['persist_p50'] / raw['p50']:.2f} | written "
                        f"{r['rows_written_median']:.0f}"
                    )
                    if path == "staged":
                        print(
                            "        staged persister phases, mean per refresh (ms): "
                            + "  ".join(
                                f"{k} {1000 * v:.2f}"
                                for k, v in sorted(r["phases_mean"].items(), key=lambda kv: -kv[1])
                            )
                        )
        for inv, o in zip(invs, out, strict=True):
            after = await inv.persister.row_counts(MANAGER)
            before = o["row_counts_before"]
            o["row_counts_after"] = after
            expected = {c: inv.cloud.count(c) for c in ("vms", "flavors", "images")}
            lost = {k: (before[k], after[k]) for k in before if after[k] < before[k]}
            if lost or any(after[k] != v for k, v in expected.items()):
                print(
                    f"  WARNING [{backend}, {inv.vms:,d}]: active rows lost by targeted refreshes "
                    f"(before, after): {lost}; cloud has {expected}"
                )
                o["rows_lost"] = lost
        return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--inventories", default="1000,100000", help="vms in the database")
    parser.add_argument("--iterations-1", type=int, default=200)
    parser.add_argument("--iterations-100", type=int, default=50)
    parser.add_argument(
        "--batches",
        default="1,100",
        help="vms per refresh; 1 runs --iterations-1 times, others --iterations-100 times",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--statements", action="store_true", help="print statement times")
    parser.add_argument("--json", help="write all figures to this file")
    args = parser.parse_args()

    info = machine_info()
    info["code"] = code_fingerprint()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    sizes = [int(x) for x in args.inventories.split(",")]
    cases = [
        (b, args.iterations_1 if b == 1 else args.iterations_100)
        for b in (int(x) for x in args.batches.split(","))
    ]
    print_machine(info)
    print(
        f"targeted refresh benchmark: embedded simulator; per case {WARMUP} warm-up refreshes "
        "(not counted); the inventories' refreshes interleaved; each refresh's vms changed "
        "in the cloud first\n"
    )
    results: list[dict[str, Any]] = []
    for backend in backends:
        rs = await run_backend(backend, sizes, cases, args.seed)
        results += rs
        if args.statements:
            for r in rs:
                for case in r["cases"]:
                    print(
                        f"    statements of the last {case['batch']}-vm refresh "
                        f"[{backend}, {r['vms']:,d} vms]:"
                    )
                    for k, (s, n) in sorted(
                        case["statements_last"].items(), key=lambda kv: -kv[1][0]
                    )[:12]:
                        print(f"      {1000 * s:8.2f} ms  {n:3d}x  {k}")
                    n = sum(int(c) for _, c in case["statements_last"].values())
                    print(f"      ({n} statements and COPYs in all)")
        print()

    print(f"summary (ms); load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"  {'backend':<11} {'vms in db':>9} {'batch':>5} {'path':<8} {'p50':>8} {'p99':>8} "
        f"{'collect p50':>11} {'persist p50':>11} {'queries':>7}"
    )
    for r in results:
        for c in r["cases"]:
            print(
                f"  {r['backend']:<11} {r['vms']:>9,d} {c['batch']:>5} {c['path']:<8} "
                f"{ms(c['p50'])} {ms(c['p99'])} {ms(c['collect_p50']):>11} "
                f"{ms(c['persist_p50']):>11} {c['queries_median']:>7.0f}"
            )
    goals = {("postgresql", 1): 0.010, ("postgresql", 100): 0.030, ("sqlite", 1): 0.010}
    print("\ngoals: p50 (PG 1 vm <= 10 ms and <= 4x raw, 100 vms <= 30 ms; SQLite 1 vm <= 10 ms);")
    print("ratio large/small inventory <= 1.2 (default path):")
    for backend in backends:
        rs = sorted((r for r in results if r["backend"] == backend), key=lambda r: r["vms"])
        for r in rs:
            by = {(c["batch"], c["path"]): c for c in r["cases"]}
            for batch in sorted({b for b, _ in by}):
                c, raw = by[(batch, "default")], by[(batch, "raw")]
                goal = goals.get((backend, batch))
                verdict = "" if goal is None else (" met" if c["p50"] <= goal else " MISSED")
                print(
                    f"  {backend:<11} {r['vms']:>7,d} vms, {batch:3d} vm(s): p50 "
                    f"{1000 * c['p50']:.2f} ms{verdict}; x{c['p50'] / raw['p50']:.2f} raw "
                    f"({1000 * raw['p50']:.2f} ms); staged path "
                    f"{1000 * by[(batch, 'staged')]['p50']:.2f} ms"
                )
        if len(rs) >= 2:
            small, large = rs[0], rs[-1]
            for cs, cl in zip(small["cases"], large["cases"], strict=True):
                if cs["path"] == "raw":
                    continue
                ratio50 = cl["p50"] / cs["p50"]
                print(
                    f"  {backend:<11} {cs['path']:<8} batch {cs['batch']:3d}: p50 "
                    f"{large['vms']:,d}/{small['vms']:,d} = {ratio50:.2f} "
                    f"({'met' if ratio50 <= 1.2 else 'MISSED'}), p99 ratio "
                    f"{cl['p99'] / cs['p99']:.2f}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2))
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
