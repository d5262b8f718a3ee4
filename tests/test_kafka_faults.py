"""The Kafka catcher under broker faults (real Tansu brokers): no wedge, no unbounded wait,
no silent skip.

* a broker restarted without its topics (memory engine): the catcher goes on, reads
  the new log from its start and asks for a full refresh of the manager it feeds;
* a topic deleted and recreated under the catcher: the same;
* a broker restarted with its topics (S3 engine on moto): the catcher goes on where
  it was, with no reset and nothing skipped;
* a broker that stops answering (SIGSTOP): commits give up after ``commit_timeout``,
  the catcher reports itself unhealthy after ``stall_timeout``, and ``close`` returns
  within its bound instead of hanging.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from catchers.kafka.catcher import KafkaCatcher
from catchers.kafka.settings import KafkaSettings
from tests.fixtures.kafka_broker import PrivateBroker, private_broker
from tests.fixtures.moto_server import AwsClients, MotoServer
from tests.test_kafka_catcher import FakeSink, ids, plain, produce, route, settings, wait_until

kafka = pytest.mark.kafka


def catcher_for(config: KafkaSettings, sink: FakeSink) -> KafkaCatcher:
    return KafkaCatcher(
        config,
        sink=sink,
        route=route,
        feeds=lambda topic: ("m1",),
        clock=asyncio.get_running_loop().time,
    )


def full_refreshes(sink: FakeSink) -> int:
    return sum(1 for s in sink.submissions for t in s.targets if t.is_full)


def vms(sink: FakeSink) -> list[str]:
    return [str(t).rsplit(":", 1)[1] for s in sink.submissions for t in s.targets if not t.is_full]


async def create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


@kafka
async def test_a_broker_restarted_without_its_topics_is_read_again_and_refreshed(
    kafka_private_broker: PrivateBroker,
) -> None:
    broker = kafka_private_broker
    topic = "inventory-events"
    await create_topic(broker.bootstrap, topic)
    await produce(broker.bootstrap, topic, [plain(f"vm-{i}") for i in range(5)])
    sink = FakeSink()
    # a heartbeat slower than the commits: the first commit after the restart meets the
    # new broker before the member learns that its group is gone
    config = settings(
        broker.bootstrap,
        topic,
        "group-restart",
        heartbeat_interval=3.0,
        session_timeout=10.0,
        stall_timeout=5.0,
    )
    catcher = catcher_for(config, sink)
    await catcher.start()
    try:
        await wait_until(lambda: len(sink.submissions) == 5, "5 submissions")
        broker.restart()  # memory engine: topics and committed offsets are gone
        sink.commit_all()  # the refreshes commit while the broker is away
        await produce(broker.bootstrap, topic, [plain(f"new-{i}") for i in range(3)])

        await wait_until(
            lambda: {"new-0", "new-1", "new-2"} <= set(vms(sink)),
            "the records of the new log",
            timeout=60,
        )
        await wait_until(lambda: full_refreshes(sink) >= 1, "a full refresh of m1")
        assert all(t.manager == "m1" for s in sink.submissions for t in s.targets)
        stats = catcher.stats()
        assert sum(stats.offset_resets.values()) >= 1
        assert stats.full_refresh_requests >= 1
        sink.commit_all()
        await wait_until(catcher.healthy, "a healthy catcher")
    finally:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await catcher.stop()
        await catcher.close()
        assert loop.time() - started < 10


@kafka
async def test_a_recreated_topic_is_read_from_its_start_and_its_manager_refreshed(
    kafka_bootstrap: str, kafka_topic_factory: Any, kafka_group_id: str
) -> None:
    topic = await kafka_topic_factory()
    await produce(kafka_bootstrap, topic, [plain(f"vm-{i}") for i in range(8)])
    sink = FakeSink()
    async with catcher_for(settings(kafka_bootstrap, topic, kafka_group_id), sink) as catcher:
        await wait_until(lambda: len(sink.submissions) == 8, "8 submissions")
        sink.commit_all()
        await wait_until(lambda: catcher.stats().committed == {f"{topic}/0": 8}, "commit 8")

        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()
        await produce(kafka_bootstrap, topic, [plain(f"new-{i}") for i in range(3)])

        await wait_until(
            lambda: {"new-0", "new-1", "new-2"} <= set(vms(sink)), "the records of the new log"
        )
        await wait_until(lambda: full_refreshes(sink) == 1, "a full refresh of m1")
        assert catcher.stats().offset_resets == {f"{topic}/0": 1}
        sink.commit_all()
        await wait_until(
            lambda: catcher.stats().committed == {f"{topic}/0": 3}, "offset 3 committed"
        )
        assert catcher.healthy()


@kafka
async def test_a_broker_that_stops_answering_makes_the_catcher_unhealthy_not_stuck(
    kafka_private_broker: PrivateBroker,
) -> None:
    broker = kafka_private_broker
    topic = "paused-events"
    await create_topic(broker.bootstrap, topic)
    await produce(broker.bootstrap, topic, [plain(f"vm-{i}") for i in range(4)])
    sink = FakeSink()
    config = settings(broker.bootstrap, topic, "group-paused", stall_timeout=2.0)
    catcher = catcher_for(config, sink)
    await catcher.start()
    loop = asyncio.get_running_loop()
    try:
        await wait_until(lambda: len(sink.submissions) == 4, "4 submissions")
        assert catcher.healthy()
        broker.pause()
        sink.commit_all()  # positions now wait to be committed to a broker that is silent
        await wait_until(lambda: not catcher.healthy(), "an unhealthy catcher", timeout=30)
        assert catcher.unhealthy_reason() is not None
        started = loop.time()
        await catcher.stop()
        await catcher.close()
        # drain_timeout + 2 commit_timeouts + 2 session_timeouts, with room for a loaded machine
        assert loop.time() - started < 12
    finally:
        broker.resume()


@kafka
async def test_a_broker_restarted_with_its_topics_goes_on_where_it_was(
    tmp_path: Path, moto: MotoServer
) -> None:
    bucket = "tansu"
    async with AwsClients(moto)("s3") as s3:
        await s3.create_bucket(Bucket=bucket)
    env = {
        **moto.env,
        "AWS_ENDPOINT": moto.endpoint_url,
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": moto.region,
    }
    broker = private_broker(tmp_path, storage=f"s3://{bucket}/", env=env)
    try:
        topic = "kept-events"
        await create_topic(broker.bootstrap, topic)
        await produce(broker.bootstrap, topic, [plain(f"vm-{i}") for i in range(5)])
        sink = FakeSink()
        config = settings(broker.bootstrap, topic, "group-kept", stall_timeout=5.0)
        async with catcher_for(config, sink) as catcher:
            await wait_until(lambda: len(sink.submissions) == 5, "5 submissions")
            sink.commit(*ids(topic, 0, [0, 1, 2]))
            await wait_until(
                lambda: catcher.stats().committed == {f"{topic}/0": 3}, "offset 3 committed"
            )
            broker.restart()  # S3 engine: the topic and the committed offsets are kept
            sink.commit_all()
            await produce(broker.bootstrap, topic, [plain(f"new-{i}") for i in range(3)])
            await wait_until(
                lambda: {"new-0", "new-1", "new-2"} <= set(vms(sink)),
                "the records produced after the restart",
                timeout=60,
            )
            sink.commit_all()
            await wait_until(
                lambda: catcher.stats().committed.get(f"{topic}/0") == 8,
                "offset 8 committed",
                timeout=60,
            )
            assert catcher.stats().offset_resets == {}
            assert full_refreshes(sink) == 0
            assert catcher.healthy()
        # nothing was skipped: every record was handed on at least once
        assert {f"vm-{i}" for i in range(5)} <= set(vms(sink))
    finally:
        broker.stop()


@kafka
@pytest.mark.parametrize("policy", ["earliest", "latest"])
async def test_a_new_group_starts_where_auto_offset_reset_says_without_a_refresh(
    kafka_bootstrap: str, kafka_topic_factory: Any, kafka_group_id: str, policy: str
) -> None:
    topic = await kafka_topic_factory()
    await produce(kafka_bootstrap, topic, [plain(f"old-{i}") for i in range(3)])
    sink = FakeSink()
    config = settings(kafka_bootstrap, topic, kafka_group_id, auto_offset_reset=policy)
    async with catcher_for(config, sink) as catcher:
        await wait_until(lambda: catcher.assignment(), "an assignment")
        if policy == "latest":  # the position is at the end before anything new comes
            await wait_until(catcher.lag, "a position at the end")
        await produce(kafka_bootstrap, topic, [plain("new-0")])
        await wait_until(lambda: "new-0" in vms(sink), "the new record")
        expected = ["new-0"] if policy == "latest" else ["old-0", "old-1", "old-2", "new-0"]
        assert vms(sink) == expected
        assert catcher.stats().offset_resets == {}
        assert full_refreshes(sink) == 0
