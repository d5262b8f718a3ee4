"""Kafka as the benchmarks drive it (the Tansu broker is the tests' ``private_broker``):
topics, a backlog of events, and a consumer group's committed offset against the topic's end.

Flow: simulator / **backlog producer** -> Tansu broker -> refreshd's Kafka catcher.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from processes import until


async def create_topic(bootstrap: str, topic: str, partitions: int) -> str:
    """Create ``topic`` and wait (20 s at most) until its partitions are visible."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )

        async def visible() -> bool:
            described = await admin.describe_topics([topic])
            return bool(described) and len(described[0].get("partitions", [])) == partitions

        await until(visible, 20, f"topic {topic}")
    finally:
        await admin.close()
    return topic


@contextlib.asynccontextmanager
async def group_consumer(
    bootstrap: str, group: str | None = None, **kw: int
) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer (of ``group``, committing nothing itself), stopped afterwards."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, **kw
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def committed(bootstrap: str, topic: str, group: str) -> int:
    """The offset ``group`` committed in partition 0 of ``topic``."""
    async with group_consumer(bootstrap, group) as consumer:
        return int(await consumer.committed(TopicPartition(topic, 0)) or 0)


async def committed_and_end(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """The offset ``group`` committed in partition 0 and that partition's end (ListOffsets)."""
    async with group_consumer(bootstrap, group) as consumer:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        offset = await consumer.committed(tp) or 0
        await consumer.seek_to_end(tp)
        end = await consumer.position(tp)
        return offset, end


async def topic_end(bootstrap: str, topic: str) -> int:
    """The highwater of partition 0, from a fetch response (Tansu's ListOffsets is wrong)."""
    async with group_consumer(
        bootstrap, max_partition_fetch_bytes=1, fetch_max_wait_ms=50
    ) as consumer:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        for _ in range(200):
            await consumer.getmany(tp, timeout_ms=50, max_records=1)
            highwater = consumer.highwater(tp)
            if highwater is not None:
                return int(highwater)
        raise TimeoutError(f"no highwater for {topic}")


async def produce_backlog(bootstrap: str, topic: str, n: int, vms: int) -> None:
    """``n`` CloudEvents "vm updated" for the first ``vms`` vms, round robin."""
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
