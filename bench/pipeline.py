"""The whole pipeline: simulator -> Kafka -> `refreshd run` -> PostgreSQL.

Flow: simulator -> Tansu broker -> `refreshd run` (child) -> PostgreSQL; figures from /metrics.

Phase A (latency): the daemon does its start-up full refresh of a simulator
(10k vms) that holds still and is restarted; the same cloud then changes itself
at --rate events/s and delivers every event to Kafka; the daemon (a real
subprocess, debounce --debounce) persists into PostgreSQL. Over --duration
seconds after a warm-up it
reports event-to-commit latency p50/p99 (cloud event time to refresh commit, from
the daemon's histogram), the event rate it kept up with, coalescing (events per
refreshed target), refreshes per second, and the daemon's RSS over time.

It also reports how many refreshes were targeted and how many full (at a rate the
daemon keeps up with, all of them should be targeted) and the consumer lag at the
start and the end of the window (flat when the daemon keeps up).

Phase B (throughput): a database, topic and consumer group of its own, and a
simulator that does not change itself, so the cloud and the database agree: the
daemon does its start-up full refresh and is stopped; --backlog events for
existing vms are produced; the daemon is started again and the time until every
record is committed gives the highest sustained event rate.  (Phase B used to
reuse phase A's database, which phase A's churned cloud had filled with vms the
fresh simulator does not have: a full refresh would then archive most of them,
the mass-deletion guard refused it and it was retried forever.)

Every wait is bounded (--timeout for the drain); on SIGTERM or Ctrl-C the
benchmark stops its children (daemon, simulator, broker) and drops its databases.

    .venv/bin/python bench/pipeline.py --rate 2000 --duration 300
    .venv/bin/python bench/pipeline.py --phase b --backlog 100000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from databases import temp_database
from kafka_topics import committed_and_end, produce_backlog
from machine import load_average
from metrics import diff, full_refresh_done, latency_buckets, scrape, total
from processes import (
    REFRESHD,
    Child,
    cancel_on_signals,
    free_port,
    http_ok,
    until,
    wait_http,
)
from simulator import simulator_command
from stats import histogram_quantile

from tests.fixtures.kafka_broker import private_broker


def daemon_config(
    path: Path,
    *,
    db: str,
    port: int,
    sim_url: str,
    bootstrap: str,
    topic: str,
    group: str,
    debounce: float,
    max_delay: float,
) -> None:
    path.write_text(f"""
database_url = "{db}"
status_interval = 10
[batching]
debounce = {debounce}
max_delay = {max_delay}
max_targets = 2000
full_refresh_threshold = 5000
max_pending_targets = 50000
[http]
listen = "127.0.0.1:{port}"
[[managers]]
name = "awesome"
provider = "awesome_cloud"
endpoint = "{sim_url}"
refresh_interval = "24h"
ids_per_request = 200
[[catchers]]
type = "kafka"
bootstrap_servers = "{bootstrap}"
topics = "{topic}"
group_id = "{group}"
manager = "awesome"
commit_interval = 0.2
session_timeout = 6
heartbeat_interval = 1
""")


@dataclass
class Setup:
    """A phase's database, ports and daemon config (its own topic and consumer group)."""

    sim_port: int
    sim_url: str
    url: str
    config: Path
    topic: str
    group: str


class Bench:
    """The children of one run (broker, simulators, daemons), stopped in reverse order."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="refreshd-pipeline-"))
        self.procs: list[Child] = []
        self.bootstrap = ""

    def start(self, args: list[str], log: str) -> Child:
        proc = Child(args, self.work / log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in reversed(self.procs):  # daemons before the simulators they read from
            p.stop()
        self.procs.clear()

    @contextlib.asynccontextmanager
    async def setup(self, name: str) -> AsyncIterator[Setup]:
        """A database of its own and a config for phase ``name``; the children are stopped
        before the database is dropped."""
        async with temp_database(f"bench_pipe_{uuid.uuid4().hex[:8]}") as dsn:
            try:
                sim_port, http_port = free_port(), free_port()
                sim_url, url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{http_port}"
                topic, group = f"awesome-{uuid.uuid4().hex[:6]}", f"refreshd-{uuid.uuid4().hex[:6]}"
                config = self.work / f"{name}.toml"
                daemon_config(
                    config,
                    db=dsn,
                    port=http_port,
                    sim_url=sim_url,
                    bootstrap=self.bootstrap,
                    topic=topic,
                    group=group,
                    debounce=self.args.debounce,
                    max_delay=self.args.max_delay,
                )
                yield Setup(sim_port, sim_url, url, config, topic, group)
            finally:
                self.stop_all()  # before the database is dropped

    async def daemon(self, config: Path, url: str, log: str) -> Child:
        daemon = self.start([str(REFRESHD), "run", "--config", str(config)], log)
        await until(
            lambda: not daemon.alive() or http_ok(url + "/readyz"), 300, "the daemon to be ready"
        )
        if not daemon.alive():
            raise RuntimeError(f"the daemon exited; see {daemon.log}")
        return daemon

    async def start_up(self, s: Setup, log: str) -> None:
        """The daemon's start-up full refresh, after which it is stopped."""
        first = await self.daemon(s.config, s.url, log)
        await until(lambda: full_refresh_done(s.url), 300, "the start-up full refresh")
        first.stop()

    async def phase_a(self) -> None:
        args = self.args
        async with self.setup("phase_a") as s:
            # the start-up full refresh against a cloud that holds still, so that the
            # measured stream does not begin with the backlog of that refresh
            still = self.start(simulator_command(s.sim_port, args.vms), "simulator_a0.log")
            await wait_http(s.sim_url + "/healthz")
            await self.start_up(s, "daemon_a0.log")
            still.stop()
            self.start(  # the same cloud (same seed), now changing --rate times a second
                simulator_command(
                    s.sim_port, args.vms, churn=args.rate, bootstrap=self.bootstrap, topic=s.topic
                ),
                "simulator_a.log",
            )
            await wait_http(s.sim_url + "/healthz")
            daemon = await self.daemon(s.config, s.url, "daemon_a.log")
            print(
                f"phase A: {args.rate:.0f} events/s into Kafka, debounce {args.debounce}s, "
                f"max_delay {args.max_delay}s, {args.vms} vms; warm-up {args.warmup:.0f}s, "
                f"measuring {args.duration:.0f}s; load average {load_average()}"
            )
            await asyncio.sleep(args.warmup)
            topic, group = s.topic, s.group
            before, t0 = await scrape(s.url), time.monotonic()
            c0, e0 = await committed_and_end(self.bootstrap, topic, group)
            rss: list[tuple[float, float]] = []
            lags: list[tuple[float, int]] = []
            while time.monotonic() - t0 < args.duration:
                rss.append((time.monotonic() - t0, daemon.rss_mb()))
                c, e = await committed_and_end(self.bootstrap, topic, group)
                lags.append((time.monotonic() - t0, e - c))
                await asyncio.sleep(min(10.0, args.duration / 10))
            after, elapsed = await scrape(s.url), time.monotonic() - t0
            c1, e1 = await committed_and_end(self.bootstrap, topic, group)
            rss.append((elapsed, daemon.rss_mb()))
            lags.append((elapsed, e1 - c1))
            lb0, lb1 = latency_buckets(before), latency_buckets(after)
            acked = diff(before, after, "refreshd_events_committed_total")
            enq = diff(before, after, "refreshd_targets_enqueued_total")
            coal = diff(before, after, "refreshd_targets_coalesced_total")
            targeted = diff(
                before, after, "refreshd_refreshes_total", kind="targeted", outcome="success"
            )
            full = diff(before, after, "refreshd_refreshes_total", kind="full", outcome="success")
            failed = diff(before, after, "refreshd_refreshes_total", outcome="failure")
            produced = e1 - e0
            print(
                f"  events produced       {produced / elapsed:8.0f} /s "
                f"(topic end advanced by {produced:,} records)"
            )
            print(
                f"  events committed      {acked / elapsed:8.0f} /s = "
                f"{100 * acked / max(produced, 1):.1f}% of produced; offsets committed "
                f"{c1 - c0} = {100 * (c1 - c0) / max(produced, 1):.1f}%"
            )
            print("  consumer lag          " + ", ".join(f"{t:.0f}s:{n}" for t, n in lags))
            print(
                f"  latency p50 / p99     {histogram_quantile(lb0, lb1, 0.5) * 1000:8.0f} ms / "
                f"{histogram_quantile(lb0, lb1, 0.99) * 1000:.0f} ms  (event time -> commit)"
            )
            print(
                f"  coalescing            {acked / max(enq - coal, 1):8.2f} events per "
                "refreshed target"
            )
            print(
                f"  refreshes             {(targeted + full) / elapsed:8.2f} /s: "
                f"{targeted:.0f} targeted, {full:.0f} full, {failed:.0f} failed"
            )
            print("  daemon RSS (MB)       " + ", ".join(f"{t:.0f}s:{m:.0f}" for t, m in rss))
            print(f"  load average at end   {load_average()}")

    async def phase_b(self) -> None:
        args = self.args
        async with self.setup("phase_b") as s:
            topic, group = s.topic, s.group
            self.start(simulator_command(s.sim_port, args.vms), "simulator_b.log")
            await wait_http(s.sim_url + "/healthz")
            print(
                f"phase B: backlog of {args.backlog:,} events over {args.vms} vms; "
                f"load average {load_average()}"
            )
            await self.start_up(s, "daemon_b0.log")
            c_start, _ = await committed_and_end(self.bootstrap, topic, group)
            await produce_backlog(self.bootstrap, topic, args.backlog, args.vms)
            _, end = await committed_and_end(self.bootstrap, topic, group)
            t_start = time.monotonic()
            daemon = await self.daemon(s.config, s.url, "daemon_b.log")
            t_ready = time.monotonic()
            committed = c_start

            async def drained() -> bool:
                nonlocal committed
                committed, _ = await committed_and_end(self.bootstrap, topic, group)
                return committed >= end or not daemon.alive()

            try:
                await until(drained, args.timeout, "the backlog to drain", interval=0.2)
                done = committed >= end
            except TimeoutError:
                done = False
            t_end = time.monotonic()
            m = await scrape(s.url) if daemon.alive() else {}
            rss = daemon.rss_mb() if daemon.alive() else float("nan")
            ok, runs = {"outcome": "success"}, "refreshd_refreshes_total"
            records = committed - c_start
            print(
                f"  {'drained' if done else 'NOT drained: committed'} {records} of "
                f"{end - c_start} records in {t_end - t_ready:.1f}s after ready "
                f"({t_end - t_start:.1f}s after start): {records / (t_end - t_ready):,.0f} "
                f"events/s; daemon RSS {rss:.0f} MB"
            )
            print(
                f"  refreshes: {total(m, runs, kind='targeted', **ok):.0f} targeted, "
                f"{total(m, runs, kind='full', **ok):.0f} full, "
                f"{total(m, runs, outcome='failure'):.0f} failed; "
                f"load average {load_average()}"
            )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--debounce", type=float, default=0.1)
    ap.add_argument(
        "--max-delay",
        type=float,
        default=0.25,
        help="batching max_delay: under a steady stream it, not debounce, "
        "decides when a batch goes",
    )
    ap.add_argument("--duration", type=float, default=300)
    ap.add_argument("--warmup", type=float, default=20)
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--phase", choices=("a", "b", "ab"), default="ab")
    ap.add_argument("--timeout", type=float, default=600, help="seconds the drain may take")
    args = ap.parse_args()
    cancel_on_signals()
    bench = Bench(args)
    broker = await asyncio.to_thread(private_broker, bench.work)
    bench.bootstrap = broker.bootstrap
    print(f"logs and configs in {bench.work}; load average {load_average()}")
    try:
        if "a" in args.phase:
            await bench.phase_a()
        if "b" in args.phase:
            await bench.phase_b()
        print(f"  logs in {bench.work}")
    except asyncio.CancelledError:
        print(f"interrupted; stopping children (logs in {bench.work})", file=sys.stderr)
    finally:
        bench.stop_all()
        broker.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
