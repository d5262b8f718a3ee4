"""End to end through Kafka: simulator -> topic -> `refreshd run` (a real process) -> PostgreSQL.

The AwesomeCloud simulator runs in the test process (it is the fake cloud); a
:class:`Delivery` pushes every event of the cloud to a fresh topic; the daemon
runs as a subprocess with one manager and one Kafka catcher, its periodic full
refresh 24 h away, so that after its start-up full refresh only targeted
refreshes (driven by the events) can bring the database to the cloud's state.
What is asserted is what a user sees: rows in PostgreSQL (compared with the
cloud by ``tests.cloud_state``), the consumer group's committed offset (read
by a separate consumer), ``refresh_runs``, ``/metrics`` and the daemon's log.

The daemon is stopped with signals sent from here and waited for without
blocking the event loop: it needs the in-process simulator to answer while
it shuts down.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.persistence import schema
from daemon.persistence.db import create_engine
from providers.awesome_cloud.simulator.app import FaultPlan
from providers.awesome_cloud.simulator.cloud import Cloud
from providers.awesome_cloud.simulator.delivery import Delivery, KafkaTransport, Mode
from providers.awesome_cloud.simulator.model import VmChoices, random_vm
from providers.awesome_cloud.simulator.server import SimulatorServer, churn_forever
from tests.cloud_state import (
    assert_database_equals_cloud,
    cloud_state,
    database_state,
    diff_states,
    skeletal_refs,
)
from tests.daemon_process import DaemonProcess, free_port, wait_for, write_config

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

MANAGER = "awesome"
CATCHER = "kafka-e2e"
CATCHER_OPTIONS: dict[str, Any] = {
    # durations as strings: the catcher's settings take units like the rest of the config
    "session_timeout": "3s",  # Tansu keeps a killed member until its session expires
    "heartbeat_interval": "500ms",
    "rebalance_timeout": "1s",  # Tansu makes every join wait this long
    "commit_timeout": "500ms",
    "commit_interval": "200ms",
    "poll_timeout": "100ms",
    "drain_timeout": "5s",
}
CONVERGE_TIMEOUT = 60.0


# -- the environment of one test ------------------------------------------------------


@dataclass
class Env:
    """The fake cloud, its event delivery, the topic and group, the daemon and the database."""

    bootstrap: str
    topic: str
    group: str
    cloud: Cloud
    server: SimulatorServer
    delivery: Delivery
    daemon: DaemonProcess
    engine: AsyncEngine
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # daemon

    async def start_daemon(self) -> None:
        self.daemon.start()
        await self.daemon.wait_ready(timeout=60)

    async def terminate(self, timeout: float = 60) -> int:
        """SIGTERM; the exit code once the daemon exited (the loop keeps serving the cloud)."""
        self.daemon.signal(signal.SIGTERM)
        await wait_for(lambda: not self.daemon.alive(), timeout=timeout, what="exit on SIGTERM")
        assert self.daemon.proc is not None
        return self.daemon.proc.returncode

    async def kill(self) -> None:
        self.daemon.signal(signal.SIGKILL)
        await wait_for(lambda: not self.daemon.alive(), timeout=10, what="exit on SIGKILL")

    async def metric(self, name: str, **labels: str) -> float:
        return await self.daemon.metric(name, labels)

    # cloud -> topic

    async def delivered(self) -> int:
        """Wait until every event of the cloud is in the topic; how many were delivered."""
        await wait_for(
            lambda: self.delivery.stats.cursor == self.cloud.last_sequence,
            timeout=30,
            what="the delivery to catch up with the cloud",
        )
        return self.delivery.stats.delivered

    async def churn(self, per_second: float, seed: int) -> asyncio.Task[None]:
        task = asyncio.create_task(churn_forever(self.cloud, per_second=per_second, seed=seed))
        self.tasks.append(task)
        return task

    # database

    async def full_refreshes(self) -> list[Any]:
        return [r for r in await refresh_runs(self.engine) if r.kind == "full"]

    async def wait_full_refresh(self) -> None:
        async def done() -> bool:
            return any(r.error is None for r in await self.full_refreshes())

        await wait_for(done, timeout=60, interval=0.1, what="the start-up full refresh")

    async def wait_converged(
        self, what: str, timeout: float = CONVERGE_TIMEOUT, *, allow_skeletal: bool = False
    ) -> None:
        """Wait until the database equals the cloud; fail with the difference.

        ``allow_skeletal``: see :func:`assert_database_equals_cloud`."""

        async def equal() -> bool:
            db, cloud = await database_state(self.engine, MANAGER), cloud_state(self.cloud)
            if allow_skeletal:
                for collection, refs in skeletal_refs(db).items():
                    for ref in refs - cloud[collection].keys():
                        del db[collection][ref]
            return not diff_states(db, cloud)

        try:
            await wait_for(equal, timeout=timeout, interval=0.25, what=what)
        except AssertionError:
            await assert_database_equals_cloud(
                self.engine, MANAGER, self.cloud, context=what, allow_skeletal=allow_skeletal
            )
            raise

    async def wait_committed(self, offset: int, timeout: float = CONVERGE_TIMEOUT) -> None:
        async def reached() -> bool:
            return await committed_offset(self.bootstrap, self.group, self.topic) == offset

        await wait_for(reached, timeout=timeout, interval=0.25, what=f"committed offset {offset}")


EnvFactory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def e2e(
    tmp_path: Path,
    pg_url: str,
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., Awaitable[str]],
    kafka_group_id: str,
) -> AsyncIterator[EnvFactory]:
    """``await make(...)``: cloud, simulator, delivery, topic and config (daemon not started)."""
    envs: list[Env] = []

    async def make(
        *,
        vms: int = 200,
        seed: int = 1,
        mode: Mode = "binary",
        routing: dict[str, Any] | None = None,
        catcher: dict[str, Any] | None = None,
        batching: dict[str, Any] | None = None,
        top: dict[str, Any] | None = None,
    ) -> Env:
        cloud = Cloud.generate(vms=vms, seed=seed, name=MANAGER)
        server = SimulatorServer(cloud)
        await server.start()
        topic = await kafka_topic_factory()
        port = free_port()
        config = write_config(
            tmp_path / "refreshd.toml",
            {
                "database_url": pg_url,
                "status_interval": "60s",
                **(top or {}),
                "http": {"listen": f"127.0.0.1:{port}"},
                "batching": {"debounce": "50ms", "max_delay": "500ms", **(batching or {})},
                "managers": [
                    {
                        "name": MANAGER,
                        "provider": "awesome_cloud",
                        "endpoint": server.url,
                        "refresh_interval": "24h",
                    }
                ],
                "catchers": [
                    {
                        "type": "kafka",
                        "name": CATCHER,
                        "bootstrap_servers": kafka_bootstrap,
                        "topics": [topic],
                        "group_id": kafka_group_id,
                        **(routing or {"manager": MANAGER}),
                        **CATCHER_OPTIONS,
                        **(catcher or {}),
                    }
                ],
            },
        )
        daemon = DaemonProcess(
            config,
            http_port=port,
            log_path=tmp_path / "refreshd.log",
            env={"REFRESHD_DATABASE_URL": pg_url},
        )
        delivery = Delivery(cloud, KafkaTransport(kafka_bootstrap, topic, key=MANAGER, mode=mode))
        env = Env(
            kafka_bootstrap,
            topic,
            kafka_group_id,
            cloud,
            server,
            delivery,
            daemon,
            create_engine(pg_url),
        )
        envs.append(env)
        env.tasks.append(asyncio.create_task(delivery.run(start_after=0)))
        return env

    try:
        yield make
    finally:
        for env in envs:
            if env.daemon.alive():
                await env.kill()
            for task in env.tasks:
                task.cancel()
            await asyncio.gather(*env.tasks, return_exceptions=True)
            await env.server.stop()
            await env.engine.dispose()
            print("---- refreshd log (tail) ----\n" + env.daemon.log()[-6000:])


# -- Kafka and database probes ---------------------------------------------------------


async def committed_offset(bootstrap: str, group: str, topic: str) -> int:
    """The group's committed position of partition 0 (0 when nothing was committed)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        offset = await consumer.committed(TopicPartition(topic, 0))
    finally:
        await consumer.stop()
    return int(offset or 0)


async def end_offset(bootstrap: str, topic: str) -> int:
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

        seen: list[int] = []  # the highwater may be 0: wait for "known", not for truthy

        async def known() -> bool:
            await consumer.getmany(tp, timeout_ms=50, max_records=1)
            highwater = consumer.highwater(tp)
            if highwater is not None:
                seen.append(int(highwater))
            return bool(seen)

        await wait_for(known, timeout=10, what=f"the highwater of {topic}")
        return seen[-1]
    finally:
        await consumer.stop()


async def read_topic(bootstrap: str, topic: str, count: int) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    records: list[Any] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)

        async def fetched() -> bool:
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                records.extend(batch)
            return len(records) >= count

        await wait_for(fetched, timeout=20, what=f"{count} records in {topic}")
    finally:
        await consumer.stop()
    return records


async def refresh_runs(engine: AsyncEngine) -> list[Any]:
    r = schema.refresh_runs
    async with engine.connect() as conn:
        return list(
            await conn.execute(
                select(r.c.kind, r.c.targets, r.c.error, r.c.started_at).order_by(r.c.id)
            )
        )


async def vm_refs(engine: AsyncEngine) -> set[str]:
    """ems_refs of the active (not archived) vms."""
    v = schema.vms
    async with engine.connect() as conn:
        rows = await conn.execute(select(v.c.ems_ref).where(v.c.archived_at.is_(None)))
        return {row.ems_ref for row in rows}


def new_vm(cloud: Cloud, rng: Random, vm_id: str) -> dict[str, Any]:
    choices = VmChoices(cloud.ids("flavors"), cloud.ids("images"), cloud.ids("security_groups"))
    return {"id": vm_id, **random_vm(rng, choices, [{}])}


def log_lines(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(pattern, line)]


# -- tests -----------------------------------------------------------------------------


async def test_a_burst_of_cloud_changes_is_refreshed_and_committed(e2e: EnvFactory) -> None:
    env = await e2e()
    await env.start_daemon()
    await env.wait_full_refresh()
    await env.wait_converged("after the start-up full refresh")

    rng = Random(11)
    env.cloud.churn(rng, 300)
    created = {f"vm-e2e-{i}" for i in range(3)}
    for vm_id in sorted(created):
        env.cloud.create("vms", new_vm(env.cloud, rng, vm_id))
    deleted = set(env.cloud.ids("vms")[:2])
    for vm_id in sorted(deleted):
        env.cloud.delete("vms", vm_id)
    env.cloud.create("vms", new_vm(env.cloud, rng, "vm-e2e-short-lived"))
    env.cloud.delete("vms", "vm-e2e-short-lived")

    events = await env.delivered()
    assert events == env.cloud.last_sequence >= 300 + 3 + 2 + 2
    await env.wait_converged("after the burst")
    refs = await vm_refs(env.engine)
    assert created <= refs and not deleted & refs and "vm-e2e-short-lived" not in refs

    # only targeted refreshes did it: the one full refresh is the start-up one
    runs = await refresh_runs(env.engine)
    assert [r.kind for r in runs if r.kind == "full"] == ["full"]
    targeted = [r for r in runs if r.kind == "targeted"]
    assert targeted and all(r.error is None for r in runs)
    touched = {
        (e["type"].rsplit(".", 1)[0], e["subject"])
        for e in env.cloud.events_after(0, limit=10_000).events
    }
    assert sum(r.targets for r in targeted) >= len(touched)

    # every record was read once, and the group's committed offset reached the topic's end
    end = await end_offset(env.bootstrap, env.topic)
    assert end == events
    await env.wait_committed(end)
    assert await env.metric("refreshd_events_received_total") == events
    assert await env.metric("refreshd_events_dead_lettered_total") == 0
    assert await env.terminate() == 0


async def test_kill_9_while_events_flow_loses_no_event(e2e: EnvFactory) -> None:
    # only targeted refreshes: the backlog re-read after a kill may hold more distinct
    # targets than the default threshold, and a full refresh would cover the churn
    env = await e2e(batching={"full_refresh_threshold": 1_000_000})
    await env.start_daemon()
    # Kills start only once the start-up full refresh committed, so that from here on only
    # targeted refreshes can bring the database to the cloud (a kill before it commits would
    # make the next start do the full refresh instead, covering part of the churn).
    await env.wait_full_refresh()
    first_churned = env.cloud.last_sequence + 1

    rng = Random(20240611)
    churn = await env.churn(per_second=200, seed=5)
    kills: list[tuple[float, float]] = []
    for _ in range(3):
        delay = rng.uniform(0.3, 2.5)
        await asyncio.sleep(delay)  # the test's input: a random moment
        received = await env.metric("refreshd_events_received_total")
        await env.kill()
        kills.append((round(delay, 2), received))
        await env.start_daemon()
    churn.cancel()
    events = await env.delivered()
    assert events - first_churned > 500, "the churn produced too few events to mean anything"
    assert all(received > 0 for _, received in kills), f"a kill came before any event: {kills}"

    # targeted refreshes alone: a vm refreshed after the image it refers to was deleted
    # leaves a skeletal row of that image (DESIGN.md 4; the next full refresh archives it)
    await env.wait_converged(
        f"after 3 kills (delay s, events received): {kills}", allow_skeletal=True
    )
    end = await end_offset(env.bootstrap, env.topic)
    assert end == events
    await env.wait_committed(end)
    full = await env.full_refreshes()
    assert len(full) == 1 and full[0].error is None, full
    assert any(r.kind == "targeted" for r in await refresh_runs(env.engine))
    assert await env.terminate() == 0


async def test_sigterm_commits_everything_processed_and_nothing_is_read_twice(
    e2e: EnvFactory,
) -> None:
    # the catcher's own grace at close is short: what is committed at exit is what the daemon
    # let its in-flight refreshes finish (shutdown_timeout) before closing the catcher
    env = await e2e(catcher={"drain_timeout": "100ms"})
    await env.start_daemon()
    await env.wait_full_refresh()
    env.server.faults.set(FaultPlan(latency_ms=300))  # refreshes take a while: work in flight

    churn = await env.churn(per_second=200, seed=9)
    await wait_for(lambda: env.cloud.last_sequence >= 400, timeout=30, what="400 cloud changes")
    churn.cancel()
    end = await env.delivered()  # the topic is quiescent from here on
    assert await end_offset(env.bootstrap, env.topic) == end

    async def all_read() -> bool:
        return await env.metric("refreshd_events_received_total") == end

    await wait_for(all_read, timeout=30, what=f"the daemon to read {end} records")
    committed_before = await committed_offset(env.bootstrap, env.group, env.topic)
    assert committed_before < end, "nothing was in flight at SIGTERM: the test proves nothing"

    assert await env.terminate() == 0
    assert await committed_offset(env.bootstrap, env.group, env.topic) == end
    await assert_database_equals_cloud(env.engine, MANAGER, env.cloud, context="after SIGTERM")
    assert "all refreshes committed" in env.daemon.log()

    env.server.faults.clear()
    await env.start_daemon()
    env.cloud.create("vms", new_vm(env.cloud, Random(3), "vm-after-restart"))
    assert await env.delivered() == end + 1

    async def refreshed() -> bool:
        return "vm-after-restart" in await vm_refs(env.engine)

    await wait_for(refreshed, timeout=30, interval=0.1, what="the new event's vm in PostgreSQL")
    assert await env.metric("refreshd_events_received_total") == 1
    await env.wait_committed(end + 1)
    assert await env.terminate() == 0


async def test_bad_records_are_dead_lettered_and_the_stream_goes_on(
    e2e: EnvFactory, kafka_topic_factory: Callable[..., Awaitable[str]]
) -> None:
    # routing by the CloudEvents source: an event from an unknown cloud has no manager
    env = await e2e(routing={"manager_attribute": "source"}, mode="structured")
    dead_letter_topic = await kafka_topic_factory(name=f"{env.topic}.dlq")
    await env.start_daemon()
    await env.wait_full_refresh()

    event = {
        "specversion": "1.0",
        "id": "e-1",
        "source": MANAGER,
        "type": "com.awesomecloud.vm.updated",
        "subject": env.cloud.ids("vms")[0],
        "data": {},
    }
    no_source = {k: v for k, v in event.items() if k != "source"}
    unknown_cloud = {**event, "id": "e-2", "source": "some-other-cloud"}
    structured = [("content-type", b"application/cloudevents+json")]
    bad: list[tuple[bytes, list[tuple[str, bytes]]]] = [
        (b"\xff\xfe\x00 not an event", [("x-trace", b"t-1")]),
        (json.dumps(no_source).encode(), structured),
        (json.dumps(unknown_cloud).encode(), structured),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap)
    await producer.start()
    try:
        for value, headers in bad:
            await producer.send_and_wait(env.topic, value, key=b"x", headers=headers)
    finally:
        await producer.stop()
    env.cloud.create("vms", new_vm(env.cloud, Random(4), "vm-after-garbage"))
    assert await env.delivered() == 1
    end = await end_offset(env.bootstrap, env.topic)
    assert end == 4

    async def refreshed() -> bool:
        return "vm-after-garbage" in await vm_refs(env.engine)

    await wait_for(refreshed, timeout=30, interval=0.1, what="the good event's vm in PostgreSQL")

    letters = await read_topic(env.bootstrap, dead_letter_topic, 3)
    assert [r.value for r in letters] == [value for value, _ in bad]
    dlq_headers = [dict((k, v.decode()) for k, v in r.headers) for r in letters]
    assert [h["refreshd-reason"] for h in dlq_headers] == [
        "undecodable",
        "undecodable",
        "unroutable",
    ]
    assert [h["refreshd-source-offset"] for h in dlq_headers] == ["0", "1", "2"]
    for h in dlq_headers:
        assert h["refreshd-source-topic"] == env.topic
        assert h["refreshd-source-partition"] == "0"
        assert h["refreshd-catcher"] == CATCHER
        assert h["refreshd-error"]
    assert dlq_headers[0]["x-trace"] == "t-1"  # the record's own headers travel with it
    assert "source" in dlq_headers[1]["refreshd-error"]
    assert "some-other-cloud" in dlq_headers[2]["refreshd-error"]

    assert (await env.daemon.get("/healthz"))[0] == 200 and env.daemon.alive()
    assert await env.metric("refreshd_events_dead_lettered_total") == 3
    assert await env.metric("refreshd_events_dead_lettered_total", reason="undecodable") == 2
    assert await env.metric("refreshd_events_dead_lettered_total", reason="unroutable") == 1
    await env.wait_committed(end)  # a dead dlq_headers is acknowledged once it is in the DLQ
    assert await env.terminate() == 0


FLOOD = 20_000
MAX_PENDING = 50
MAX_POLL_INTERVAL = 4.0
SLOW_READ_MS = 6000
"""The first refresh of the flood takes this long: the catcher stays paused past that interval."""


async def test_a_flood_is_held_back_without_leaving_the_group(e2e: EnvFactory) -> None:
    env = await e2e(
        vms=50,
        batching={"max_pending_targets": MAX_PENDING, "max_targets": MAX_PENDING},
        # a paused catcher notices room within one poll: short polls make the flood quicker
        catcher={"max_poll_interval": f"{MAX_POLL_INTERVAL:g}s", "poll_timeout": "20ms"},
    )
    await env.start_daemon()
    await env.wait_full_refresh()
    process = psutil.Process(env.daemon.pid)
    rss_before = process.memory_info().rss
    env.server.faults.set(FaultPlan(latency_ms=SLOW_READ_MS))
    env.server.stats.reset()

    samples: list[tuple[float, int]] = []  # (pending targets, rss)

    async def sample() -> None:
        while True:
            pending = await env.metric("refreshd_pending_targets", manager=MANAGER)
            samples.append((pending, process.memory_info().rss))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    env.tasks.append(sampler)
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap, linger_ms=20)
    await producer.start()
    try:
        sent = []
        for i in range(FLOOD):
            event = {
                "specversion": "1.0",
                "id": f"flood-{i}",
                "source": MANAGER,
                "type": "com.awesomecloud.vm.updated",
                "subject": f"vm-flood-{i:05d}",
                "data": {},
            }
            headers = [("content-type", b"application/cloudevents+json")]
            sent.append(
                await producer.send(
                    env.topic, json.dumps(event).encode(), key=MANAGER.encode(), headers=headers
                )
            )
        await asyncio.gather(*sent)
    finally:
        await producer.stop()

    # the first slow refresh is running and the queue is full: the catcher is paused
    await wait_for(
        lambda: (
            env.server.stats.count("vms", "ids") >= 1
            and any(pending >= MAX_PENDING for pending, _ in samples)
        ),
        timeout=30,
        what="a slow refresh in flight and a full queue",
    )
    env.server.faults.clear()  # the refresh in flight still takes SLOW_READ_MS
    end = await end_offset(env.bootstrap, env.topic)
    assert end == FLOOD
    await env.wait_committed(end, timeout=150)
    sampler.cancel()

    pending_max = max(pending for pending, _ in samples)
    rss_max = max(rss for _, rss in samples)
    growth_mb = (rss_max - rss_before) / 2**20
    print(
        f"backpressure: {len(samples)} samples, pending max {pending_max:.0f} "
        f"(max_pending_targets {MAX_PENDING}), rss before {rss_before / 2**20:.0f} MB, "
        f"max {rss_max / 2**20:.0f} MB, at the end {samples[-1][1] / 2**20:.0f} MB, "
        f"growth {growth_mb:.1f} MB"
    )
    assert pending_max <= MAX_PENDING + 1  # one record = one target
    assert growth_mb < 150

    log = env.daemon.log()
    assert log_lines(log, r"sink full, pausing"), "the catcher never paused"
    pauses = [float(m) for m in re.findall(r"resumed after (\d+\.\d+)s", log)]
    assert max(pauses) > MAX_POLL_INTERVAL, f"no pause outlasted max_poll_interval: {pauses}"
    # the member stayed in its group: one assignment at start, no revoke, no re-join
    assert len(log_lines(log, rf"kafka catcher {CATCHER}: .* assigned")) == 1, log[-3000:]
    assert not log_lines(log, rf"kafka catcher {CATCHER}: .* revoked")
    assert await env.metric("refreshd_events_received_total") == FLOOD
    assert not await vm_refs(env.engine) & {f"vm-flood-{i:05d}" for i in range(FLOOD)}
    assert await env.terminate() == 0
