"""The Kafka catcher's dead letters: bad records copied aside so that the stream goes on.

Flow: Kafka record -> (undecodable / unroutable / mapper error) -> **dead-letter
topic** -> record acknowledged -> its offset may be committed.

Guarantees:

* a record is acknowledged only once its copy is on the dead-letter topic
  (``acks="all"``): a crash before that reads it again;
* the copy keeps the record's key, value and headers (minus any earlier
  ``refreshd-*`` ones) and adds ``refreshd-error`` (why, at most 4000
  characters), ``refreshd-reason`` (a :class:`DeadLetterReason`),
  ``refreshd-source-topic`` / ``-partition`` / ``-offset`` and ``refreshd-catcher``;
* producing is retried with ``dead_letter_backoff`` until it succeeds or the
  catcher closes (which cancels what is still being produced).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from catchers.kafka.settings import KafkaCatcherStats, KafkaSettings
from catchers.routing import DeadLetterReason

log = logging.getLogger(__name__)

ERROR_HEADER = "refreshd-error"
REASON_HEADER = "refreshd-reason"
HEADER_PREFIX = "refreshd-"


class DeadLetterProducer:
    """Copies records to ``settings.dead_letter_topic_for(topic)``; calls ``on_produced`` after."""

    def __init__(
        self,
        settings: KafkaSettings,
        counters: KafkaCatcherStats,
        *,
        on_produced: Callable[[TopicPartition, int], None],
    ) -> None:
        self._settings = settings
        self._counters = counters
        self._on_produced = on_produced
        self._producer: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, options: dict[str, Any]) -> None:
        """Connect with the client ``options`` (bootstrap servers, security)."""
        s = self._settings
        self._producer = AIOKafkaProducer(
            client_id=f"{s.client_id}-dead-letters", acks="all", **options
        )
        await self._producer.start()

    def cancel(self) -> None:
        """Give up on what is still being produced: those records stay unacknowledged."""
        for task in list(self._tasks):
            task.cancel()

    async def stop(self) -> None:
        """Cancel what is still being produced and disconnect (idempotent)."""
        self.cancel()
        if self._producer is not None:
            await self._producer.stop()

    def send(self, tp: TopicPartition, record: Any, reason: DeadLetterReason, message: str) -> None:
        """Start copying ``record`` of ``tp`` aside (the caller has tracked its offset)."""
        log.warning(
            "kafka catcher %s: %s/%d@%d is %s, dead-lettering: %s",
            self._settings.name,
            tp.topic,
            tp.partition,
            record.offset,
            reason,
            message,
        )
        task = asyncio.create_task(self._produce(tp, record, reason, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    async def _produce(
        self, tp: TopicPartition, record: Any, reason: DeadLetterReason, message: str
    ) -> None:
        s = self._settings
        topic = s.dead_letter_topic_for(tp.topic)
        headers = [(k, v) for k, v in record.headers if not k.startswith(HEADER_PREFIX)]
        headers += [
            (ERROR_HEADER, message[:4000].encode()),
            (REASON_HEADER, str(reason).encode()),
            ("refreshd-source-topic", tp.topic.encode()),
            ("refreshd-source-partition", str(tp.partition).encode()),
            ("refreshd-source-offset", str(record.offset).encode()),
            ("refreshd-catcher", s.name.encode()),
        ]
        attempt = 0
        while True:
            try:
                await self._producer.send_and_wait(
                    topic, value=record.value, key=record.key, headers=headers
                )
                break
            except KafkaError as exc:
                delay = s.dead_letter_backoff[min(attempt, len(s.dead_letter_backoff) - 1)]
                attempt += 1
                self._counters.dead_letter_errors += 1
                log.warning(
                    "kafka catcher %s: %s/%d@%d: producing to dead-letter topic %s failed (%s),"
                    " retry in %.1fs",
                    s.name,
                    tp.topic,
                    tp.partition,
                    record.offset,
                    topic,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
        self._counters.dead_lettered[reason] += 1
        self._on_produced(tp, record.offset)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("kafka catcher task %s failed", task.get_name(), exc_info=exc)
