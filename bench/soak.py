"""Soak: churn plus random faults under `refreshd run`; the database must end equal to the cloud.

    simulator (own process: churn, Kafka delivery) -> Tansu broker (own) -> `refreshd run`
    -> PostgreSQL (a private cluster made with initdb/pg_ctl in a temp dir, on a free port;
    the shared server on 5432 is never touched)

After the daemon's start-up full refresh the cloud changes itself --rate times a
second and delivers every event to Kafka.  Meanwhile faults, drawn from a seeded
``random.Random``, are injected one at a time, with a quiet gap between them,
bounded in number (--max-faults) and duration:

* ``kill9``: SIGKILL the daemon, restart it after 0-5 s;
* ``broker_pause``: SIGSTOP the Tansu process for 5-25 s, then SIGCONT;
* ``db_pause``: ``pg_ctl stop -m immediate`` of the private cluster, start again after 5-30 s;
* ``http429`` / ``http500``: the simulator's read API answers 429 (Retry-After 1) or 500
  to half of its requests for 5-20 s (``/admin/v1/faults``).

After each fault the soak waits (bounded, --recover-timeout) until ``/readyz`` and
``/healthz`` answer 200 again and reports how long that took.  A daemon that exits
by itself is recorded (it is a bug) and restarted.

At --duration the churn is stopped (``POST /admin/v1/churn``), faults cleared, and
the soak waits (bounded, --drain-timeout) until the simulator has delivered every
event, the consumer group has committed the topic's end and the database equals the
cloud (read through the simulator's API; ``tests.cloud_state`` compares).  Nothing
is forced: no manual full refresh.  It prints the faults (kind, at, duration,
recovery), events produced / in the topic / committed, refresh_runs by kind and
outcome, and the differences; exit status 0 only when there are none and every
record was committed.  SIGTERM / Ctrl-C stop every child (bounded) and exit 2.

    .venv/bin/python bench/soak.py --duration 1800
    .venv/bin/python bench/soak.py --duration 300 --rate 30 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.persistence import schema  # noqa: E402
from daemon.persistence.db import create_engine  # noqa: E402
from tests.cloud_state import (  # noqa: E402
    cloud_state,
    database_state,
    diff_states,
    skeletal_refs,
)
from tests.daemon_process import DaemonProcess, free_port, write_config  # noqa: E402
from tests.fixtures.kafka_broker import PrivateBroker, private_broker  # noqa: E402
from tests.fixtures.private_postgres import PrivateCluster, _bindir  # noqa: E402

MANAGER = "awesome"
TOPIC = "soak-events"
GROUP = "refreshd-soak"
KINDS = ("kill9", "broker_pause", "db_pause", "http429", "http500")
DURATIONS = {  # seconds a fault lasts (kill9: time the daemon stays down)
    "kill9": (0.0, 5.0),
    "broker_pause": (5.0, 25.0),
    "db_pause": (5.0, 30.0),
    "http429": (5.0, 20.0),
    "http500": (5.0, 20.0),
}
CATCHER_OPTIONS = {  # as the end-to-end tests run the Kafka catcher against Tansu
    "session_timeout": "3s",
    "heartbeat_interval": "500ms",
    "rebalance_timeout": "1s",
    "commit_timeout": "500ms",
    "commit_interval": "200ms",
    "poll_timeout": "100ms",
    "drain_timeout": "5s",
    "stall_timeout": "20s",
}


@dataclass
class Fault:
    kind: str
    at: float
    """Seconds since churn started."""
    duration: float
    recovered_after: float | None = None
    """Seconds from the end of the fault until /readyz and /healthz were 200 (None: never)."""
    note: str = ""


class ApiCloud:
    """The simulator's cloud as read through its API, shaped like ``Cloud.snapshot()``."""

    def __init__(self, objects: dict[str, dict[str, dict[str, Any]]]) -> None:
        self._objects = objects

    def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        return self._objects

    @classmethod
    async def read(cls, url: str) -> ApiCloud:
        objects: dict[str, dict[str, dict[str, Any]]] = {}
        async with aiohttp.ClientSession() as http:
            for collection in ("flavors", "images", "security_groups", "vms"):
                objects[collection] = {}
                token: str | None = None
                while True:
                    params = {"limit": "5000", **({"page_token": token} if token else {})}
                    async with http.get(f"{url}/api/v1/{collection}", params=params) as resp:
                        resp.raise_for_status()
                        page = await resp.json()
                    for item in page["items"]:
                        objects[collection][item["id"]] = item
                    token = page["next_page_token"]
                    if not token:
                        break
        return cls(objects)


async def until(condition: Any, timeout: float, interval: float = 0.5) -> bool:
    """Poll ``condition`` (sync or async) until truthy; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
        except (TimeoutError, aiohttp.ClientError, OSError, SQLAlchemyError):
            value = False
        if value:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


async def http_json(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.request(method, url, json=body) as resp,
    ):
        data = await resp.json() if resp.status != 204 else None
        return resp.status, data


async def topic_end(bootstrap: str, topic: str) -> int:
    """The highwater of partition 0, from a fetch response (Tansu's ListOffsets is wrong)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=1,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        for _ in range(200):
            await consumer.getmany(tp, timeout_ms=50, max_records=1)
            highwater = consumer.highwater(tp)
            if highwater is not None:
                return int(highwater)
        raise TimeoutError(f"no highwater for {topic}")
    finally:
        await consumer.stop()


async def committed(bootstrap: str, topic: str, group: str) -> int:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return int(await consumer.committed(TopicPartition(topic, 0)) or 0)
    finally:
        await consumer.stop()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Soak:
    """The children of one run and the faults injected into them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = Path(tempfile.mkdtemp(prefix="refreshd-soak-"))
        self.faults: list[Fault] = []
        self.broker: PrivateBroker | None = None
        self.pg: PrivateCluster | None = None
        self.simulator: subprocess.Popen[bytes] | None = None
        self.daemon: DaemonProcess | None = None
        self.sim_url = ""
        self.t0 = 0.0

    # -- children --------------------------------------------------------------------

    async def start(self) -> None:
        self.broker = await asyncio.to_thread(private_broker, self.work)
        bindir = _bindir()
        if bindir is None:
            raise SystemExit("the PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        datadir = self.work / "pgdata"
        datadir.mkdir()
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: its files go to postgres
            user = pwd.getpwnam("postgres")
            for path in (self.work, datadir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.pg = PrivateCluster(bindir, datadir, free_port())
        await asyncio.to_thread(self.pg.init)
        await asyncio.to_thread(self.pg.start)
        await asyncio.to_thread(self.pg.create_database)

        admin = AIOKafkaAdminClient(bootstrap_servers=self.broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()

        sim_port = free_port()
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        with (self.work / "simulator.log").open("ab") as log:
            self.simulator = subprocess.Popen(
                [
                    *(str(Path(sys.executable).with_name("refreshd")), "simulator"),
                    *("--port", str(sim_port), "--vms", str(self.args.vms)),
                    *("--seed", str(self.args.seed)),
                    *("--kafka-bootstrap", self.broker.bootstrap, "--kafka-topic", TOPIC),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not await until(lambda: self._get_ok(self.sim_url + "/healthz"), 60, 0.2):
            raise RuntimeError(f"the simulator did not start; see {self.work}/simulator.log")

        http_port = free_port()
        config = write_config(
            self.work / "refreshd.toml",
            {
                "database_url": self.pg.url,
                "status_interval": "30s",
                "shutdown_timeout": "10s",
                "http": {"listen": f"127.0.0.1:{http_port}"},
                "batching": {"debounce": "50ms", "max_delay": "500ms"},
                "managers": [
                    {
                        "name": MANAGER,
                        "provider": "awesome_cloud",
                        "endpoint": self.sim_url,
                        "refresh_interval": "24h",  # only the events can converge the database
                    }
                ],
                "catchers": [
                    {
                        "type": "kafka",
                        "name": "soak",
                        "bootstrap_servers": self.broker.bootstrap,
                        "topics": [TOPIC],
                        "group_id": GROUP,
                        "manager": MANAGER,
                        **CATCHER_OPTIONS,
                    }
                ],
            },
        )
        self.daemon = DaemonProcess(
            config, http_port=http_port, log_path=self.work / "refreshd.log"
        )
        await self.start_daemon()

    async def start_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.start()
        if not await until(self._ready, self.args.recover_timeout, 0.2):
            raise RuntimeError(f"refreshd was not ready in time; see {self.daemon.log_path}")

    async def _get_ok(self, url: str) -> bool:
        status, _ = await http_json("GET", url)
        return status == 200

    async def _ready(self) -> bool:
        assert self.daemon is not None
        if not self.daemon.alive():
            return False
        return await self._get_ok(self.daemon.url + "/readyz")

    async def _healthy(self) -> bool:
        assert self.daemon is not None
        return await self._ready() and await self._get_ok(self.daemon.url + "/healthz")

    def stop_all(self) -> None:
        """Every child, each wait bounded; the private cluster's data is removed, logs kept."""
        if self.daemon is not None and self.daemon.alive():
            started = time.monotonic()
            self.daemon.signal(signal.SIGTERM)
            try:
                code = self.daemon.wait(30)
                print(
                    f"daemon stopped on SIGTERM in {time.monotonic() - started:.1f}s "
                    f"(exit status {code})"
                )
            except subprocess.TimeoutExpired:
                print("daemon did not stop within 30s of SIGTERM: killed")
                self.daemon.signal(signal.SIGKILL)
                self.daemon.wait(10)
        if self.daemon is not None:
            log = self.daemon.log()
            print(
                f"daemon log: {log.count(' ERROR ')} ERROR lines, "
                f"{log.count('Traceback')} logged tracebacks ({self.daemon.log_path})"
            )
        if self.simulator is not None and self.simulator.poll() is None:
            self.simulator.terminate()
            try:
                self.simulator.wait(15)
            except subprocess.TimeoutExpired:
                self.simulator.kill()
                self.simulator.wait(10)
        if self.broker is not None:
            self.broker.stop()  # SIGCONT first when paused
        if self.pg is not None:
            with contextlib.suppress(subprocess.SubprocessError):  # already stopped
                self.pg.stop()
            shutil.rmtree(self.pg.datadir, ignore_errors=True)

    # -- faults ----------------------------------------------------------------------

    async def inject(self, kind: str) -> Fault:
        assert self.daemon is not None and self.broker is not None and self.pg is not None
        low, high = DURATIONS[kind]
        duration = round(self.rng.uniform(low, high), 1)
        fault = Fault(kind, time.monotonic() - self.t0, duration)
        print(f"  {fault.at:7.0f}s  {kind:<13} {duration:5.1f}s ...", flush=True)
        if kind == "kill9":
            self.daemon.kill()
            await asyncio.sleep(duration)
            self.daemon.start()
        elif kind == "broker_pause":
            self.broker.pause()
            try:
                await asyncio.sleep(duration)
            finally:
                self.broker.resume()
        elif kind == "db_pause":
            await asyncio.to_thread(self.pg.stop)
            try:
                await asyncio.sleep(duration)
            finally:
                await asyncio.to_thread(self.pg.start)
        else:
            status = 429 if kind == "http429" else 500
            plan: dict[str, Any] = {"error_rate": 0.5, "status": status}
            if status == 429:
                plan["retry_after"] = 1
            await http_json("POST", self.sim_url + "/admin/v1/faults", plan)
            try:
                await asyncio.sleep(duration)
            finally:
                await http_json("DELETE", self.sim_url + "/admin/v1/faults")
        ended = time.monotonic()
        if await until(self._healthy, self.args.recover_timeout):
            fault.recovered_after = time.monotonic() - ended
        return fault

    async def check_alive(self) -> None:
        """A daemon that exited without being killed is a bug: record it and restart."""
        assert self.daemon is not None and self.daemon.proc is not None
        if not self.daemon.alive():
            code = self.daemon.proc.returncode
            self.faults.append(
                Fault("daemon_exit", time.monotonic() - self.t0, 0.0, note=f"exit {code}!")
            )
            print(f"  daemon exited by itself with status {code}; restarting", flush=True)
            self.daemon.start()
            await until(self._ready, self.args.recover_timeout, 0.2)

    async def run_faults(self) -> None:
        args = self.args
        kinds = [k for k in args.faults.split(",") if k]
        end = self.t0 + args.duration
        while len([f for f in self.faults if f.kind in KINDS]) < args.max_faults:
            gap = self.rng.uniform(args.gap / 2, args.gap * 1.5)
            kind = self.rng.choice(kinds)
            if time.monotonic() + gap + DURATIONS[kind][1] > end:
                break
            await asyncio.sleep(gap)
            await self.check_alive()
            self.faults.append(await self.inject(kind))
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        await self.check_alive()

    # -- the run ---------------------------------------------------------------------

    async def run(self) -> int:
        args = self.args
        await self.start()
        assert self.daemon is not None and self.broker is not None and self.pg is not None
        engine = create_engine(self.pg.url)
        try:

            async def full_refreshed() -> bool:
                async with engine.connect() as conn:
                    r = schema.refresh_runs
                    query = select(func.count()).where(r.c.kind == "full", r.c.error.is_(None))
                    return bool((await conn.execute(query)).scalar_one())

            if not await until(full_refreshed, 300):
                raise RuntimeError("no start-up full refresh within 300 s")
            _, state = await http_json(
                "POST", self.sim_url + "/admin/v1/churn", {"per_second": args.rate}
            )
            seq0 = state["last_sequence"]
            self.t0 = time.monotonic()
            print(
                f"soak: {args.vms} vms, churn {args.rate:g}/s, {args.duration:.0f}s, seed "
                f"{args.seed}, faults {args.faults}; load average {load()}; logs in {self.work}",
                flush=True,
            )
            await self.run_faults()

            _, state = await http_json("POST", self.sim_url + "/admin/v1/churn", {"per_second": 0})
            await http_json("DELETE", self.sim_url + "/admin/v1/faults")
            churned = time.monotonic() - self.t0
            produced = state["last_sequence"] - seq0
            print(f"churn stopped after {churned:.0f}s; load average {load()}", flush=True)
            drain_start = time.monotonic()
            deadline = drain_start + args.drain_timeout

            async def delivered() -> bool:
                _, s = await http_json("GET", self.sim_url + "/admin/v1/churn")
                return all(c >= s["last_sequence"] for c in s["delivered"])

            all_delivered = await until(delivered, deadline - time.monotonic())
            cloud = await ApiCloud.read(self.sim_url)
            expected = cloud_state(cloud)
            bootstrap = self.broker.bootstrap
            end = await topic_end(bootstrap, TOPIC)
            offsets = {"committed": 0}
            lines: list[str] = []
            tolerated = {"n": 0}

            async def converged() -> bool:
                offsets["committed"] = await committed(bootstrap, TOPIC, GROUP)
                stored = await database_state(engine, MANAGER)
                tolerated["n"] = 0
                for collection, refs in skeletal_refs(stored).items():
                    for ref in refs - expected[collection].keys():
                        del stored[collection][ref]  # a reference to what the cloud deleted
                        tolerated["n"] += 1
                lines[:] = diff_states(stored, expected)
                return offsets["committed"] >= end and not lines

            await self.check_alive()
            equal = await until(converged, max(0.0, deadline - time.monotonic()), 2.0)
            drained = time.monotonic() - drain_start
            async with engine.connect() as conn:
                r = schema.refresh_runs
                runs = (
                    await conn.execute(
                        select(r.c.kind, r.c.error.is_(None), func.count())
                        .group_by(r.c.kind, r.c.error.is_(None))
                        .order_by(r.c.kind)
                    )
                ).all()
        finally:
            await engine.dispose()

        print(f"\nfaults injected ({len(self.faults)}):")
        print(f"  {'kind':<13} {'at (s)':>7} {'duration (s)':>12} {'recovered (s)':>14}  note")
        for f in self.faults:
            rec = "never" if f.recovered_after is None else f"{f.recovered_after:.1f}"
            print(f"  {f.kind:<13} {f.at:7.0f} {f.duration:12.1f} {rec:>14}  {f.note}")
        by_kind = {k: sum(1 for f in self.faults if f.kind == k) for k in KINDS}
        print("  by kind: " + ", ".join(f"{k} {n}" for k, n in by_kind.items()))
        print("\nevents:")
        print(f"  produced by the cloud      {produced:8d} ({produced / churned:.1f}/s)")
        print(f"  delivered to the topic     {'all' if all_delivered else 'NOT all':>8}")
        print(f"  records in the topic       {end:8d}")
        print(f"  committed by the daemon    {offsets['committed']:8d}")
        print(f"  lost (not committed)       {max(0, end - offsets['committed']):8d}")
        print(
            "refresh_runs: " + ", ".join(f"{k} {'ok' if ok else 'failed'} {n}" for k, ok, n in runs)
        )
        rows = sum(len(v) for v in expected.values())
        print(
            f"\ndatabase vs cloud ({rows} cloud rows; {tolerated['n']} skeletal rows for "
            f"deleted references tolerated): "
            + ("EQUAL" if equal else f"{len(lines)} DIFFERENCE LINES")
            + f", {drained:.0f}s after churn stopped; load average {load()}"
        )
        for line in lines[:60]:
            print("  " + line)
        exits = [f for f in self.faults if f.kind == "daemon_exit"]
        stuck = [f for f in self.faults if f.kind in KINDS and f.recovered_after is None]
        if exits or stuck:  # not losses, but bugs worth a look in the daemon's log
            print(
                f"anomalies: the daemon exited by itself {len(exits)} time(s); "
                f"{len(stuck)} fault(s) not recovered from within {self.args.recover_timeout:.0f}s"
            )
        return 0 if equal else 1


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=1800, help="seconds of churn and faults")
    ap.add_argument("--vms", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=30, help="cloud changes per second")
    ap.add_argument("--seed", type=int, default=1, help="seed of the faults and the cloud")
    ap.add_argument("--faults", default=",".join(KINDS), help="comma-separated kinds")
    ap.add_argument("--gap", type=float, default=30, help="mean quiet seconds between faults")
    ap.add_argument("--max-faults", type=int, default=200)
    ap.add_argument("--recover-timeout", type=float, default=120)
    ap.add_argument("--drain-timeout", type=float, default=300)
    args = ap.parse_args()
    unknown = set(args.faults.split(",")) - set(KINDS) - {""}
    if unknown:
        ap.error(f"unknown fault kinds {sorted(unknown)}; choose from {KINDS}")
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    soak = Soak(args)
    try:
        return await soak.run()
    except asyncio.CancelledError:
        print(f"interrupted; stopping children (logs in {soak.work})", file=sys.stderr)
        return 2
    finally:
        await asyncio.to_thread(soak.stop_all)
        print(f"logs in {soak.work}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(asyncio.run(main()))
