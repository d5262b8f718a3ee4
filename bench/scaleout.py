"""Scale-out: 1, 2 and 3 `refreshd run` processes on 4 managers, one database, one group.

Flow: simulators (tests/scaleout_cluster.py) -> Kafka -> N `refreshd run` -> one PostgreSQL.

For each number of daemons N: four AwesomeCloud simulators (the managers)
change themselves at --rate events/s in total; every event goes to one Kafka
topic with 4 partitions keyed by manager; N daemons (real subprocesses, the
same config) share one PostgreSQL database and one consumer group.

Reported per N (the N=1 run is the baseline the others are compared with):

* event-to-commit latency p50/p99 over --duration seconds of steady churn
  (from the daemons' histograms, merged);
* refreshes (targeted, full) recorded in ``refresh_runs`` -- full refreshes
  must stay at one per manager (the start-up one) however many daemons run;
* takeover (N >= 2): the owner of one manager is killed with SIGKILL during
  the churn (and restarted); seconds from the kill until its ownership lock is
  gone, and until the first commit of that manager by another process
  (``refresh_runs``: started after the kill, end time).  Then the same with
  SIGSTOP (a hung process, woken with SIGCONT afterwards): its lock goes when
  the server ends the silent session (``[ownership] session_timeout``, 5 s in
  this harness);
* whether the database equals every cloud after the churn stops, and how long
  that took.

On 2 cores throughput does not scale with N; correctness and takeover are the
figures.

    .venv/bin/python bench/scaleout.py --rate 40 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from databases import temp_database
from kafka_topics import create_topic
from machine import load_average
from metrics import latency_buckets, parse
from stats import histogram_quantile

from tests.daemon_process import wait_for
from tests.fixtures.kafka_broker import private_broker
from tests.scaleout_cluster import Cluster, make_cluster

MANAGERS = 4


async def merged_latencies(cluster: Cluster) -> dict[float, float]:
    """The event-to-commit histogram of every live daemon, merged: le -> cumulative count."""
    merged: dict[float, float] = {}
    for d in cluster.daemons:
        if not d.alive():
            continue
        _, text = await d.get("/metrics")
        for le, count in latency_buckets(parse(text)).items():
            merged[le] = merged.get(le, 0.0) + count
    return merged


@dataclass(frozen=True)
class Takeover:
    freed: float = math.nan
    """seconds from the signal until the holder's ownership lock was gone"""
    committed: float = math.nan
    """seconds from the signal until another process committed a refresh of the manager"""


async def takeover(cluster: Cluster, n: int, signum: signal.Signals) -> Takeover:
    """Send ``signum`` to the holder of a manager; measure the hand-over (SIGSTOP: a hung
    process, woken up again with SIGCONT once another process committed)."""
    owners = await wait_for(cluster.owners, timeout=30, what="an owned manager")
    manager, holder = sorted(owners.items())[0]
    index = int(holder.removeprefix("p"))
    sent_wall, sent = datetime.now(UTC), time.monotonic()
    os.kill(cluster.daemons[index].pid, signum)
    freed: list[float] = []

    async def committed_elsewhere() -> float | None:
        if not freed and (await cluster.owners()).get(manager) != holder:
            freed.append(time.monotonic() - sent)
        for run in await cluster.runs(manager):
            if run.error is None and run.started_at >= sent_wall:
                return max(0.0, run.started_at.timestamp() + run.duration - sent_wall.timestamp())
        return None

    try:
        committed = float(
            await wait_for(committed_elsewhere, timeout=60, interval=0.02, what="takeover")
        )
    except AssertionError:  # stopped inside a save transaction: its row lock stays
        committed = math.nan
    result = Takeover(freed[0] if freed else math.nan, committed)
    print(
        f"  N={n}: {manager} held by {holder}, {signum.name}: lock free after "
        f"{result.freed:.2f}s, first commit by another process after {committed:.2f}s"
    )
    if signum is signal.SIGSTOP:
        os.kill(cluster.daemons[index].pid, signal.SIGCONT)
    else:  # the killed process comes back, as systemd would restart it
        cluster.daemons[index].start()
        await cluster.daemons[index].wait_ready(timeout=60)
    return result


async def run_one(n: int, args: argparse.Namespace, bootstrap: str, work: Path) -> dict[str, Any]:
    async with temp_database(f"refreshd_scaleout_{uuid.uuid4().hex[:8]}") as dsn:
        topic = await create_topic(bootstrap, f"scaleout-{uuid.uuid4().hex[:8]}", MANAGERS)
        run_dir = work / f"n{n}"
        run_dir.mkdir()
        cluster = await make_cluster(
            run_dir,
            dsn,
            processes=n,
            managers=MANAGERS,
            vms=args.vms,
            kafka=(bootstrap, topic, f"scaleout-{n}-{uuid.uuid4().hex[:6]}"),
        )
        try:
            await cluster.start()
            for m in cluster.managers:
                await wait_for(
                    lambda m=m: cluster.full_refreshes(m), timeout=120, what=f"{m} start-up"
                )
            cluster.churn(per_second=args.rate / MANAGERS)
            await asyncio.sleep(args.warmup)
            before = await merged_latencies(cluster)
            await asyncio.sleep(args.duration)
            after = await merged_latencies(cluster)
            p50 = histogram_quantile(before, after, 0.5)
            p99 = histogram_quantile(before, after, 0.99)
            events = after.get(math.inf, 0.0) - before.get(math.inf, 0.0)

            kill = stop = Takeover()
            if n >= 2:
                kill = await takeover(cluster, n, signal.SIGKILL)
                await asyncio.sleep(5)  # keep the churn going a little after the takeover
                stop = await takeover(cluster, n, signal.SIGSTOP)
                await asyncio.sleep(5)

            for task in cluster.tasks[len(cluster.deliveries) :]:
                task.cancel()
            stopped = time.monotonic()
            await cluster.delivered()
            await wait_for(cluster.converged, timeout=120, interval=0.25, what="convergence")
            converge = time.monotonic() - stopped
            runs = [r for m in cluster.managers for r in await cluster.runs(m)]
            targeted = sum(1 for r in runs if r.error is None and r.kind == "targeted")
            full = sum(1 for r in runs if r.error is None and r.kind == "full")
            failed = sum(1 for r in runs if r.error is not None)
            for error in sorted({r.error[:160] for r in runs if r.error is not None}):
                print(f"  N={n}: failed refresh: {error}")
            return {
                "n": n,
                "events": events,
                "p50": p50,
                "p99": p99,
                "targeted": targeted,
                "full": full,
                "failed": failed,
                "kill": kill,
                "stop": stop,
                "converge": converge,
                "load": load_average(),
            }
        finally:
            await cluster.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=40.0, help="cloud changes/s, all managers")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per N")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--vms", type=int, default=500, help="vms per manager")
    parser.add_argument("--daemons", default="1,2,3")
    parser.add_argument("--keep-logs", help="directory for the daemons' logs (kept)")
    args = parser.parse_args()
    print(f"load before: {load_average()}, nproc {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="refreshd-scaleout-") as tmp:
        work = Path(args.keep_logs or tmp)
        work.mkdir(parents=True, exist_ok=True)
        broker = await asyncio.to_thread(private_broker, work)
        bootstrap = broker.bootstrap
        try:
            results = []
            for n in (int(x) for x in args.daemons.split(",")):
                results.append(await run_one(n, args, bootstrap, work))
        finally:
            broker.stop()
    base = results[0]
    print(
        f"\n{MANAGERS} managers x {args.vms} vms, {args.rate:g} changes/s, "
        f"{args.duration:g}s measured per N (baseline: N={base['n']})"
    )
    print(
        "  N  events  p50 ms (x base)  p99 ms (x base)  targeted  full  failed"
        "  SIGKILL free/commit s  SIGSTOP free/commit s  converged s  loadavg"
    )
    for r in results:
        k, st = r["kill"], r["stop"]
        print(
            f"  {r['n']}  {r['events']:6.0f}"
            f"  {r['p50'] * 1000:6.0f} ({r['p50'] / base['p50']:4.2f})"
            f"  {r['p99'] * 1000:8.0f} ({r['p99'] / base['p99']:4.2f})  {r['targeted']:8d}"
            f"  {r['full']:4d}  {r['failed']:6d}"
            f"  {k.freed:9.2f} / {k.committed:5.2f}  {st.freed:9.2f} / {st.committed:5.2f}"
            f"  {r['converge']:11.2f}  {r['load']}"
        )


if __name__ == "__main__":
    asyncio.run(main())
