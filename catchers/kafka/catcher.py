"""The Kafka catcher: a consumer-group member that turns records into Targets.

Flow: **Kafka record -> CloudEvent -> route -> EventMapper -> Target(s) + Ack**
-> batcher (``TargetSink``) -> refresh committed -> Ack done -> offset committed.

Guarantees (each kept by the module named):

* at-least-once: a partition's committed offset never passes a record whose
  Ack is not done; after a crash or a rebalance the partition is re-read from
  there.  Auto-commit is off; commits are periodic (:mod:`catchers.kafka.commits`).
* bad input never stops the stream: a record that does not decode, that no
  manager claims, or whose mapper raises is copied to the dead-letter topic,
  and only then counts as acknowledged (:mod:`catchers.kafka.records`,
  :mod:`catchers.kafka.dead_letters`).
* backpressure without leaving the group: partitions are paused while the
  sink is full, and polled all the same (:mod:`catchers.kafka.polling`).

This module assembles those parts and owns their lifecycle.  Shutdown is
two-phase (``daemon.model.catcher.Catcher``): :meth:`KafkaCatcher.stop` takes no
more records in but keeps the member in its group, paused and polling; after
the batcher has drained, :meth:`KafkaCatcher.close` waits at most
``drain_timeout`` for in-flight acks, commits, and closes the consumer and
the dead-letter producer.  Settings and counters: :mod:`catchers.kafka.settings`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from catchers.kafka.commits import OffsetCommitter
from catchers.kafka.dead_letters import (
    ERROR_HEADER,
    HEADER_PREFIX,
    REASON_HEADER,
    DeadLetterProducer,
)
from catchers.kafka.polling import FETCH_MAX_WAIT_MS, PollLoop
from catchers.kafka.records import RecordIntake
from catchers.kafka.resets import Feeds, OffsetResets, managers_fed
from catchers.kafka.settings import (
    KafkaCatcherStats,
    KafkaSettings,
    milliseconds,
)
from catchers.options import settings_from
from catchers.routing import ROUTING_OPTIONS, DeadLetterReason, Route, route_from_options
from daemon.api import CatcherContext, ManagedCatcher, TargetSink

__all__ = [
    "ERROR_HEADER",
    "HEADER_PREFIX",
    "REASON_HEADER",
    "DeadLetterReason",
    "KafkaCatcher",
    "KafkaCatcherStats",
    "KafkaSettings",
    "create",
]

log = logging.getLogger(__name__)


class KafkaCatcher(ManagedCatcher):
    """Reads ``settings.topics`` in a consumer group and feeds ``sink`` (a daemon ``Catcher``)."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        sink: TargetSink,
        route: Route,
        feeds: Feeds,
        clock: Callable[[], float],
    ) -> None:
        """``feeds(topic)`` names the managers a topic's events go to: they get a full
        refresh when the topic's log no longer fits the catcher's position."""
        self.name = settings.name
        self.counters = KafkaCatcherStats()
        """Live counters (read them, do not write them)."""
        self._settings = settings
        self._commits = OffsetCommitter(settings, self.counters)
        self._dead_letters = DeadLetterProducer(
            settings, self.counters, on_produced=self._commits.acknowledge
        )
        intake = RecordIntake(
            route=route,
            sink=sink,
            commits=self._commits,
            dead_letters=self._dead_letters,
            counters=self.counters,
            clock=clock,
        )
        self._resets = OffsetResets(
            settings,
            sink=sink,
            commits=self._commits,
            counters=self.counters,
            feeds=feeds,
            clock=clock,
        )
        self._polling = PollLoop(
            settings,
            sink=sink,
            intake=intake,
            commits=self._commits,
            resets=self._resets,
            counters=self.counters,
        )
        self._clock = clock
        self._consumer: Any = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Connect, join the group and start fetching (idempotent)."""
        if self._consumer is not None:
            return
        s = self._settings
        options = s.client_options()
        consumer = AIOKafkaConsumer(
            client_id=s.client_id,
            group_id=s.group_id,
            group_instance_id=s.group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset="none",  # catchers.kafka.resets applies s.auto_offset_reset
            max_poll_records=s.max_poll_records,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            session_timeout_ms=milliseconds(s.session_timeout),
            heartbeat_interval_ms=milliseconds(s.heartbeat_interval),
            max_poll_interval_ms=milliseconds(s.max_poll_interval),
            rebalance_timeout_ms=milliseconds(s.rebalance_timeout) if s.rebalance_timeout else None,
            **options,
        )
        consumer.subscribe(list(s.topics), listener=_Listener(self))
        self._consumer = consumer
        try:
            await self._dead_letters.start(options)
            await consumer.start()
        except BaseException:
            self._closed = True
            await self._close_clients()
            raise
        log.info("kafka catcher %s: started, group %s, topics %s", s.name, s.group_id, s.topics)
        self._resets.start(consumer)
        self._polling.start(consumer)
        self._commits.start(consumer)

    async def stop(self) -> None:
        """Take no more records in; returns once nothing more is handed to the sink.

        The member stays in its group (paused, polling) so that :meth:`close`
        can still commit what gets acknowledged meanwhile.
        """
        await self._polling.stop_intake()

    async def close(self) -> None:
        """Wait ``drain_timeout`` for in-flight acks, commit, leave the group (idempotent).

        Every step has a time limit (a broker that does not answer cannot hold the
        daemon's shutdown): at most about ``drain_timeout + 2 * commit_timeout +
        2 * session_timeout`` in all.  Leaving the group gets ``session_timeout``:
        past it the broker drops the member anyway.
        """
        if self._consumer is None or self._closed:
            return
        self._closed = True
        s = self._settings
        name = s.name
        try:
            await _bounded(self.stop(), s.poll_timeout + s.commit_timeout, "stopping intake", name)
            if not await self._commits.wait_drained(None, s.drain_timeout):
                log.warning(
                    "kafka catcher %s: closing with %d records unacknowledged; they will be read"
                    " again",
                    name,
                    self._commits.in_flight(),
                )
            await self._commits.stop()
            await self._commits.commit()
        finally:
            await _bounded(
                self._polling.close(),
                s.poll_timeout + s.session_timeout,
                "ending the fetch loop",
                name,
            )
            await self._commits.stop()
            self._dead_letters.cancel()
            self._commits.forget_all()
            await _bounded(self._close_clients(), s.session_timeout, "leaving the group", name)
            log.info("kafka catcher %s: closed", name)

    # -- observation ---------------------------------------------------------

    def healthy(self) -> bool:
        """False before start, once the fetch or commit loop died, or while either is stalled
        (no poll, or only failed commits, for ``stall_timeout``): partitions would stall."""
        return self.unhealthy_reason() is None

    def unhealthy_reason(self) -> str | None:
        """Why :meth:`healthy` is False (None when it is True)."""
        polling = self._polling
        if not polling.started:
            return "not started"
        if self._closed:
            return "fetch loop failed" if polling.failed() else None
        if not polling.running():
            return "fetch loop ended"
        if not self._commits.running():
            return "commit loop ended"
        now = self._clock()
        return polling.stalled(now) or self._commits.stalled(now)

    def stats(self) -> KafkaCatcherStats:
        """The live counters (``lag`` and ``committed`` keyed by ``"topic/partition"``)."""
        self.counters.in_flight = self._commits.in_flight()
        return self.counters

    def assignment(self) -> frozenset[TopicPartition]:
        return self._commits.assignment()

    def in_flight(self, partition: TopicPartition | None = None) -> int:
        return self._commits.in_flight(None if partition is None else (partition,))

    async def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition: the broker's highwater minus our fetch position."""
        if self._polling.closing:
            return {}
        return await self._commits.lag()

    # -- rebalances --------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._commits.revoke(revoked)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._commits.assign(assigned)
        self._polling.on_assigned(assigned)
        for tp in sorted(assigned):
            log.info(
                "kafka catcher %s: %s/%d assigned%s",
                self._settings.name,
                tp.topic,
                tp.partition,
                " (paused)" if self._polling.paused else "",
            )

    # -- plumbing ----------------------------------------------------------------

    async def _close_clients(self) -> None:
        try:
            if self._consumer is not None:
                await self._consumer.stop()
        finally:
            await self._dead_letters.stop()


async def _bounded(step: Awaitable[None], seconds: float, what: str, name: str) -> None:
    """Await ``step`` for at most ``seconds``; past that it is cancelled and logged."""
    try:
        async with asyncio.timeout(seconds):
            await step
    except TimeoutError:
        log.warning("kafka catcher %s: %s took over %.1fs; given up", name, what, seconds)


def create(options: Mapping[str, Any], context: CatcherContext) -> KafkaCatcher:
    """The ``refreshd.catchers`` entry point ``kafka``: a catcher from a ``[[catchers]]`` block.

    Routing options (see :func:`~catchers.routing.route_from_options`) choose
    the manager; every other key is a :class:`KafkaSettings` field.
    """
    route = route_from_options(options, context.managers)
    settings = settings_from(KafkaSettings, options, "kafka catcher options", skip=ROUTING_OPTIONS)
    return KafkaCatcher(
        settings,
        sink=context.sink,
        route=route,
        feeds=managers_fed(options, context.managers),
        clock=context.clock,
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, catcher: KafkaCatcher) -> None:
        self._catcher = catcher

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._catcher._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._catcher._on_assigned(set(assigned))
