"""The Kafka catcher's answer to positions that no longer fit the log: read again, refresh all.

Flow: poll loop (broker answers) / commit loop (position vs highwater) -> **OffsetResets**
-> seek per ``auto_offset_reset`` + ``Target.full(manager)`` for each manager the topic
feeds -> batcher.

The consumer is made with ``auto_offset_reset="none"`` so that aiokafka does not
reset a position silently; this module does it instead:

* a partition the group never committed (a new group) starts where
  ``auto_offset_reset`` says.  Nothing was missed: nothing else happens.  But
  a partition that this process did commit and whose committed offset is now
  unknown (the broker restarted without the group's data) is a reset, below.
* a position the broker answers ``OffsetOutOfRange`` for (retention deleted
  records before it, the log was truncated), or a position beyond the
  partition's highwater (the topic was recreated under us: Tansu answers such
  a fetch with no records instead of an error), means events may have been
  skipped.  Each such partition is logged at warning, counted
  (``offset_resets``, exported as ``refreshd_kafka_offset_resets_total``), its
  bookkeeping is started afresh, it is read again from where
  ``auto_offset_reset`` says, and a full refresh is asked for every manager
  the topic feeds (the full refresh makes up for whatever was skipped).  A
  request the sink refuses (queue full) is asked again on the next reset or
  check, never dropped.

Known limit: a topic recreated and refilled past our old position before the
catcher looks again cannot be told from offsets alone (Kafka clients skip those
records too); a topic id check would need the broker's topic ids, which aiokafka
does not expose.  Every wait here is bounded by ``commit_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from catchers.kafka.commits import OffsetCommitter, label
from catchers.kafka.settings import KafkaCatcherStats, KafkaSettings
from daemon.api import Ack, ManagerEndpoint, QueueFullError, Target, TargetSink

log = logging.getLogger(__name__)

Feeds = Callable[[str], Collection[str]]
"""``topic -> names of the managers its events may be routed to``."""


def managers_fed(options: Mapping[str, Any], managers: Mapping[str, ManagerEndpoint]) -> Feeds:
    """The managers each topic of a catcher feeds, from its routing options.

    ``manager``: that one; ``managers``: the topic's entry; ``manager_by_account``:
    every manager whose provider has a routing key; ``manager_attribute``: every one.
    """
    if isinstance(single := options.get("manager"), str):
        return lambda topic: (single,)
    if isinstance(table := options.get("managers"), Mapping):
        by_topic = {str(k): str(v) for k, v in table.items()}
        return lambda topic: (by_topic[topic],) if topic in by_topic else ()
    if options.get("manager_by_account") is True:
        keyed = tuple(sorted(m.name for m in managers.values() if m.routing_key is not None))
        return lambda topic: keyed
    every = tuple(sorted(managers))
    return lambda topic: every


class OffsetResets:
    """Resets the position of partitions whose log changed under the catcher."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        sink: TargetSink,
        commits: OffsetCommitter,
        counters: KafkaCatcherStats,
        feeds: Feeds,
        clock: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._commits = commits
        self._counters = counters
        self._feeds = feeds
        self._clock = clock
        self._consumer: Any = None
        self._wanted: set[str] = set()
        """Managers whose full refresh is still to be handed to the sink."""

    def start(self, consumer: Any) -> None:
        self._consumer = consumer
        self._commits.on_out_of_range = self.beyond_highwater

    async def handle(self, exc: KafkaError) -> bool:
        """Answer a fetch error that is about positions; False when ``exc`` is another one."""
        if isinstance(exc, NoOffsetForPartitionError):
            partitions = {p for p in exc.args if isinstance(p, TopicPartition)}
            # A partition this process committed before has lost its committed offset:
            # the broker lost the group's data (restarted without it); records may be gone.
            lost = {tp for tp in partitions if label(tp) in self._counters.committed}
            if lost:
                await self.reset({tp: "the group's committed offset is gone" for tp in lost})
            await self._seek(partitions - lost)
            return True
        if isinstance(exc, OffsetOutOfRangeError):
            found = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            await self.reset(
                {tp: f"offset {offset} is out of range" for tp, offset in found.items()}
            )
            return True
        return False

    async def beyond_highwater(self, partitions: set[TopicPartition]) -> None:
        """The commit loop's check: positions past these partitions' highwater (often none)."""
        if not partitions:
            self.request_refreshes()
            return
        consumer = self._consumer
        await self.reset(
            {
                tp: f"position is beyond the highwater {consumer.highwater(tp)} (topic recreated?)"
                for tp in partitions
            }
        )

    async def reset(self, why: Mapping[TopicPartition, str]) -> None:
        """Read these partitions again per ``auto_offset_reset``; ask for full refreshes."""
        s = self._settings
        for tp, reason in sorted(why.items()):
            managers = sorted(self._feeds(tp.topic))
            log.warning(
                "kafka catcher %s: %s/%d: %s; reading it again from the %s and asking for a"
                " full refresh of %s",
                s.name,
                tp.topic,
                tp.partition,
                reason,
                "beginning" if s.auto_offset_reset == "earliest" else "end",
                ", ".join(managers) or "no manager (none is fed by this topic)",
            )
            resets = self._counters.offset_resets
            resets[label(tp)] = resets.get(label(tp), 0) + 1
            self._wanted.update(managers)
        self._commits.forget(why)
        await self._seek(set(why))
        self.request_refreshes()

    def request_refreshes(self) -> None:
        """Hand the wanted full refreshes to the sink (kept for later when it is full)."""
        if not self._wanted:
            return
        wanted = sorted(self._wanted)
        try:
            self._sink.submit([Target.full(m) for m in wanted], Ack(received_at=self._clock()))
        except QueueFullError:
            log.warning(
                "kafka catcher %s: no room for the full refresh of %s; asking again later",
                self._settings.name,
                ", ".join(wanted),
            )
            return
        self._counters.full_refresh_requests += len(wanted)
        self._wanted.clear()
        for manager in wanted:
            log.info("manager %s: full refresh asked for after an offset reset", manager)

    async def _seek(self, partitions: set[TopicPartition]) -> None:
        consumer = self._consumer
        assigned = partitions & consumer.assignment()
        if not assigned:
            return
        earliest = self._settings.auto_offset_reset == "earliest"
        try:
            async with asyncio.timeout(self._settings.commit_timeout):
                if earliest:
                    await consumer.seek_to_beginning(*assigned)
                else:
                    await consumer.seek_to_end(*assigned)
        except (TimeoutError, KafkaError) as exc:
            log.warning(
                "kafka catcher %s: seeking %s to the %s failed (%s); tried again on the next error",
                self._settings.name,
                ", ".join(label(tp) for tp in sorted(assigned)),
                "beginning" if earliest else "end",
                exc or "no answer",
            )
