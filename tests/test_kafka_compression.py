"""Compressed record batches (gzip, snappy, lz4, zstd) are read like plain ones.

aiokafka needs its codec extras (``aiokafka[lz4,snappy,zstd]``, i.e. ``cramjam``) to
decompress snappy, lz4 and zstd; without them the fetch fails with an error that is
not retriable and the catcher's fetch loop ends.  Each codec's batch is produced to
the real broker; the catcher hands every record on and commits past all of them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from catchers.kafka.catcher import KafkaCatcher
from tests.test_kafka_catcher import FakeSink, committed, route, settings, wait_until

CODECS = ("gzip", "snappy", "lz4", "zstd")
PER_CODEC = 5


@pytest.mark.kafka
async def test_gzip_snappy_lz4_and_zstd_batches_are_consumed(
    kafka_bootstrap: str, kafka_topic_factory: Any, kafka_group_id: str
) -> None:
    topic = await kafka_topic_factory()
    for codec in CODECS:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, compression_type=codec)
        await producer.start()
        try:
            batch = producer.create_batch()
            for i in range(PER_CODEC):
                value = f'{{"vms": ["{codec}-{i}"]}}'.encode()
                assert batch.append(key=b"k", value=value, timestamp=None) is not None
            await (await producer.send_batch(batch, topic, partition=0))
        finally:
            await producer.stop()

    sink = FakeSink()
    catcher = KafkaCatcher(
        settings(kafka_bootstrap, topic, kafka_group_id),
        sink=sink,
        route=route,
        feeds=lambda topic: ("m1",),
        clock=asyncio.get_running_loop().time,
    )
    total = len(CODECS) * PER_CODEC
    async with catcher:
        await wait_until(
            lambda: len(sink.submissions) == total or not catcher.healthy(), "every record"
        )
        assert catcher.healthy(), catcher.unhealthy_reason()
        refs = [str(t).rsplit(":", 1)[1] for s in sink.submissions for t in s.targets]
        assert refs == [f"{codec}-{i}" for codec in CODECS for i in range(PER_CODEC)]
        sink.commit_all()
        await wait_until(
            lambda: catcher.stats().committed == {f"{topic}/0": total}, "all committed"
        )
    assert await committed(kafka_bootstrap, kafka_group_id, topic) == {0: total}
