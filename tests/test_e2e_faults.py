"""Faults injected for real under `refreshd run`: the database stopped during a stream, the
Kafka broker that stops answering before SIGTERM.

The environment is the one of :mod:`tests.test_e2e_kafka` (simulator, delivery to a
topic, the daemon as a subprocess), but with a PostgreSQL cluster and a Tansu broker
of this test's own (``pg_url`` and ``kafka_bootstrap`` are overridden here), so the
test may stop them without disturbing anyone else.

What is asserted is what an operator sees: ``/readyz``, ``/healthz``, ``/managers``,
``refresh_runs``, the database equal to the cloud, and how long SIGTERM takes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from daemon.service.lifecycle import SHUTDOWN_MARGIN
from tests.daemon_process import wait_for
from tests.fixtures.kafka_broker import PrivateBroker, private_broker
from tests.fixtures.private_postgres import PrivateCluster
from tests.test_e2e_kafka import EnvFactory, e2e, refresh_runs

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

__all__ = ["e2e"]  # the environment fixture, used with this module's database and broker


@pytest.fixture
def pg_url(private_postgres: PrivateCluster) -> str:
    return private_postgres.url


@pytest.fixture
def kafka_own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    broker = private_broker(tmp_path_factory.mktemp("own-broker"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_bootstrap(kafka_own_broker: PrivateBroker) -> str:
    return kafka_own_broker.bootstrap


async def recreate(bootstrap: str, topic: str) -> None:
    """Create ``topic`` again (one partition) unless something already did."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


async def get_json(env_daemon: object, path: str) -> tuple[int, dict[str, object]]:
    status, text = await env_daemon.get(path)  # type: ignore[attr-defined]
    return status, json.loads(text) if text.startswith("{") else {}


async def test_the_database_stopped_during_a_stream(
    e2e: EnvFactory, private_postgres: PrivateCluster
) -> None:
    env = await e2e(vms=100)
    await env.start_daemon()
    await env.wait_full_refresh()
    churn = await env.churn(per_second=40, seed=3)
    status, body = await get_json(env.daemon, "/managers")
    assert status == 200 and body["source"] == "database"

    private_postgres.stop()
    stopped_at = time.time()

    async def not_ready() -> bool:
        status, body = await get_json(env.daemon, "/readyz")
        return status == 503 and "database unavailable" in body.get("reasons", [])  # type: ignore[operator]

    await wait_for(not_ready, timeout=20, what="/readyz 503: database unavailable")
    status, body = await get_json(env.daemon, "/managers")
    assert status == 200, body
    assert body["source"] == "memory"
    (manager,) = body["managers"]  # type: ignore[misc]
    assert manager["name"] == "awesome" and manager["last_full_refresh_at"] is not None
    # the database away is not a liveness failure: a restart would not bring it back
    assert (await env.daemon.get("/healthz"))[0] == 200

    async def failed_meanwhile() -> bool:
        return await env.metric("refreshd_refreshes_total", outcome="failure") >= 2

    await wait_for(
        failed_meanwhile, timeout=60, what="refreshes failing while the database is away"
    )
    _, body = await get_json(env.daemon, "/managers")
    assert body["managers"][0]["last_refresh_error"]  # type: ignore[index]
    private_postgres.start()
    restarted_at = time.time()
    churn.cancel()

    await wait_for(env.daemon.ready, timeout=30, what="/readyz 200 again")
    await env.delivered()
    await env.wait_converged("after the database came back")

    async def outage_recorded() -> bool:
        runs = await refresh_runs(env.engine)
        return any(
            r.error is not None and stopped_at - 1 <= r.started_at.timestamp() <= restarted_at
            for r in runs
        )

    await wait_for(outage_recorded, timeout=30, what="refresh_runs rows of the outage")
    assert (await env.daemon.get("/healthz"))[0] == 200
    assert await env.terminate() == 0


async def test_sigterm_exits_in_time_while_the_broker_does_not_answer(
    e2e: EnvFactory, kafka_own_broker: PrivateBroker
) -> None:
    shutdown_timeout = 5.0
    env = await e2e(
        vms=50,
        top={"shutdown_timeout": f"{shutdown_timeout}s"},
        catcher={"commit_timeout": "500ms", "stall_timeout": "5s"},
    )
    await env.start_daemon()
    await env.wait_full_refresh()
    await env.churn(per_second=40, seed=4)
    await wait_for(
        lambda: env.metric("refreshd_events_received_total"),
        timeout=30,
        what="events flowing",
    )
    kafka_own_broker.pause()
    try:

        async def unhealthy() -> bool:
            status, body = await get_json(env.daemon, "/healthz")
            return status == 503 and any(
                "kafka-e2e" in reason
                for reason in body.get("reasons", [])  # type: ignore[attr-defined]
            )

        await wait_for(unhealthy, timeout=40, what="/healthz 503 naming the stalled catcher")
        started = time.monotonic()
        env.daemon.signal(signal.SIGTERM)
        limit = shutdown_timeout + SHUTDOWN_MARGIN + 3
        await wait_for(
            lambda: not env.daemon.alive(), timeout=limit + 30, what="exit after SIGTERM"
        )
        took = time.monotonic() - started
        assert took <= limit, f"SIGTERM took {took:.1f}s (limit {limit:.0f}s)"
    finally:
        kafka_own_broker.resume()


async def test_a_broker_restarted_without_its_topics_under_refreshd_run(
    e2e: EnvFactory, kafka_own_broker: PrivateBroker
) -> None:
    shutdown_timeout = 5.0
    env = await e2e(
        vms=100,
        top={"shutdown_timeout": f"{shutdown_timeout}s"},
        catcher={"stall_timeout": "10s"},
    )
    await env.start_daemon()
    await env.wait_full_refresh()
    churn = await env.churn(per_second=40, seed=6)
    await wait_for(
        lambda: env.metric("refreshd_events_received_total"), timeout=30, what="events flowing"
    )
    churn.cancel()
    await env.delivered()  # in the topic; not all of them consumed yet
    # memory engine: the topic, its unconsumed records and the group's offsets are gone
    kafka_own_broker.restart()
    await recreate(kafka_own_broker.bootstrap, env.topic)  # as an operator would

    async def refreshed_in_full() -> bool:
        return len([r for r in await env.full_refreshes() if r.error is None]) >= 2

    await wait_for(refreshed_in_full, timeout=90, what="a full refresh asked after the restart")
    assert await env.metric("refreshd_kafka_offset_resets_total") >= 1
    # events after the restart go through the new log
    churn = await env.churn(per_second=40, seed=7)
    await asyncio.sleep(3)  # the test's input: three seconds of cloud changes
    churn.cancel()
    await env.delivered()
    await env.wait_converged("after a broker restart without its topics")
    await wait_for(lambda: env.daemon.get("/healthz"), timeout=30, what="/healthz answering")
    assert (await env.daemon.get("/healthz"))[0] == 200
    started = time.monotonic()
    assert await env.terminate(timeout=shutdown_timeout + SHUTDOWN_MARGIN + 30) == 0
    took = time.monotonic() - started
    assert took <= shutdown_timeout + SHUTDOWN_MARGIN + 3, f"SIGTERM took {took:.1f}s"
