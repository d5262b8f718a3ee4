"""The Kafka catcher: a consumer-group member that turns records into Targets.

Flow: **Kafka record -> CloudEvent -> route -> EventMapper -> Target(s) + Ack**
-> batcher (``TargetSink``) -> refresh committed -> Ack done -> offset committed.

Guarantees:

* at-least-once: a partition's committed offset never passes a record whose
  Ack is not done (:class:`~catchers.offsets.OffsetTracker`); after a crash
  or a rebalance the partition is re-read from there.  Auto-commit is off;
  a periodic task commits the positions that advanced.
* bad input never stops the stream: a record that does not decode, that no
  manager claims, or whose mapper raises is copied to the dead-letter topic
  with ``refreshd-*`` headers saying why and where it came from, and only
  then counts as acknowledged.
* backpressure without leaving the group: while the sink has no room every
  assigned partition is paused and ``getmany`` keeps being called, so the
  member keeps polling within ``max_poll_interval``.  A record the sink
  refused is read again (the partition is sought back to it).
* on revoke, in-flight acks of the revoked partitions are awaited for at
  most ``commit_timeout``, what is committable is committed, and the
  partitions are forgotten.

Shutdown is two-phase (``daemon.catcher.Catcher``): :meth:`KafkaCatcher.stop`
takes no more records in but keeps the member in its group, paused and
polling; after the batcher has drained, :meth:`KafkaCatcher.close` waits at
most ``drain_timeout`` for in-flight acks, commits, and closes the consumer
and the dead-letter producer.

The settings (:class:`KafkaSettings`, durations with units) and the counters
live in :mod:`catchers.kafka_settings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from functools import partial
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from catchers.cloudevents import DecodeError, decode_kafka_record
from catchers.kafka_settings import DeadLetterReason, KafkaCatcherStats, KafkaSettings
from catchers.offsets import OffsetTracker
from catchers.routing import ROUTING_OPTIONS, Route, route_from_options
from daemon.acks import Ack, QueueFullError, TargetSink
from daemon.catcher import CatcherContext
from daemon.targets import Target

__all__ = [
    "ERROR_HEADER",
    "HEADER_PREFIX",
    "REASON_HEADER",
    "DeadLetterReason",
    "KafkaCatcher",
    "KafkaCatcherStats",
    "KafkaSettings",
    "kafka_catcher",
]

log = logging.getLogger(__name__)

ERROR_HEADER = "refreshd-error"
REASON_HEADER = "refreshd-reason"
HEADER_PREFIX = "refreshd-"


class KafkaCatcher:
    """Reads ``settings.topics`` in a consumer group and feeds ``sink`` (a daemon ``Catcher``)."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        sink: TargetSink,
        route: Route,
        clock: Callable[[], float],
    ) -> None:
        self.name = settings.name
        self.counters = KafkaCatcherStats()
        """Live counters (read them, do not write them)."""
        self._settings = settings
        self._sink = sink
        self._route = route
        self._clock = clock
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._assigned: set[TopicPartition] = set()
        self._consumer: Any = None
        self._producer: Any = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._dead_letters: set[asyncio.Task[None]] = set()
        self._acked = asyncio.Event()
        self._stopping = asyncio.Event()
        self._intake_stopped = asyncio.Event()
        self._closing = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._paused = False
        self._must_wait_for_room = False
        self._closed = False

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Connect, join the group and start fetching (idempotent)."""
        if self._consumer is not None:
            return
        s = self._settings
        common: dict[str, Any] = {"bootstrap_servers": list(s.bootstrap_servers)}
        common.update(self._security())
        consumer = AIOKafkaConsumer(
            client_id=s.client_id,
            group_id=s.group_id,
            group_instance_id=s.group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            max_poll_records=s.max_poll_records,
            session_timeout_ms=_ms(s.session_timeout),
            heartbeat_interval_ms=_ms(s.heartbeat_interval),
            max_poll_interval_ms=_ms(s.max_poll_interval),
            rebalance_timeout_ms=_ms(s.rebalance_timeout) if s.rebalance_timeout else None,
            **common,
        )
        producer = AIOKafkaProducer(client_id=f"{s.client_id}-dead-letters", acks="all", **common)
        consumer.subscribe(list(s.topics), listener=_Listener(self))
        self._consumer, self._producer = consumer, producer
        try:
            await producer.start()
            await consumer.start()
        except BaseException:
            self._closed = True
            await self._close_clients()
            raise
        log.info("kafka catcher %s: started, group %s, topics %s", s.name, s.group_id, s.topics)
        self._fetch_task = asyncio.create_task(self._fetch_loop(), name=f"kafka-fetch-{s.name}")
        self._commit_task = asyncio.create_task(self._commit_loop(), name=f"kafka-commit-{s.name}")
        self._commit_task.add_done_callback(_log_failure)

    async def stop(self) -> None:
        """Take no more records in; returns once nothing more is handed to the sink.

        The member stays in its group (paused, polling) so that :meth:`close`
        can still commit what gets acknowledged meanwhile.
        """
        self._stopping.set()
        if self._fetch_task is None or self._fetch_task.done():
            return
        stopped = asyncio.create_task(self._intake_stopped.wait())
        try:
            await asyncio.wait([stopped, self._fetch_task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()

    async def close(self) -> None:
        """Wait ``drain_timeout`` for in-flight acks, commit, leave the group (idempotent)."""
        if self._consumer is None or self._closed:
            return
        self._closed = True
        name = self._settings.name
        try:
            await self.stop()
            if not await self._wait_drained(None, self._settings.drain_timeout):
                log.warning(
                    "kafka catcher %s: closing with %d records unacknowledged; they will be read"
                    " again",
                    name,
                    self._tracker.total_in_flight(),
                )
            await _cancel(self._commit_task)
            await self._commit(None)
        finally:
            self._closing.set()
            if self._fetch_task is not None:
                await asyncio.wait([self._fetch_task])
                if not self._fetch_task.cancelled():
                    self._fetch_task.exception()  # logged by the loop itself; mark it retrieved
            await _cancel(self._commit_task)
            for task in list(self._dead_letters):
                task.cancel()
            self._tracker.revoke(self._tracker.partitions())
            await self._close_clients()
            log.info("kafka catcher %s: closed", name)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- observation ---------------------------------------------------------

    def healthy(self) -> bool:
        """False before start and once the fetch or commit loop died (partitions would stall)."""
        fetch, commit = self._fetch_task, self._commit_task
        if fetch is None or commit is None:
            return False
        if self._closed:
            return fetch.cancelled() or fetch.exception() is None
        return not fetch.done() and not commit.done()

    def stats(self) -> dict[str, Any]:
        """Counters for metrics (``lag`` and ``committed`` keyed by ``"topic/partition"``)."""
        c = self.counters
        return {
            "received": c.received,
            "decoded": c.decoded,
            "submitted": c.submitted,
            "acknowledged": c.acknowledged,
            "dead_lettered": {str(reason): n for reason, n in c.dead_lettered.items()},
            "dead_letter_errors": c.dead_letter_errors,
            "backpressure_pauses": c.backpressure_pauses,
            "paused": c.paused,
            "commits": c.commits,
            "commit_errors": c.commit_errors,
            "committed": {_label(tp): n for tp, n in c.committed.items()},
            "lag": {_label(tp): n for tp, n in c.lag.items()},
            "in_flight": self._tracker.total_in_flight(),
        }

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._assigned)

    def in_flight(self, partition: TopicPartition | None = None) -> int:
        if partition is None:
            return self._tracker.total_in_flight()
        return self._tracker.in_flight(partition)

    async def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition: the broker's highwater minus our fetch position."""
        consumer = self._consumer
        result: dict[TopicPartition, int] = {}
        if consumer is None or self._closing.is_set():
            return result
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await asyncio.wait_for(
                    consumer.position(tp), self._settings.poll_timeout
                )
            except (TimeoutError, KafkaError):
                continue
            result[tp] = max(highwater - position, 0)
        return result

    # -- fetching ------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        s = self._settings
        failures = 0
        try:
            while not self._closing.is_set():
                try:
                    if self._stopping.is_set() or self._must_wait_for_room:
                        await self._hold()
                        continue
                    if not self._sink.has_room():
                        await self._hold()
                        continue
                    batch = await self._consumer.getmany(
                        timeout_ms=_ms(s.poll_timeout), max_records=s.max_poll_records
                    )
                except KafkaError as exc:
                    if not exc.retriable:
                        raise
                    delay = s.fetch_backoff[min(failures, len(s.fetch_backoff) - 1)]
                    failures += 1
                    log.warning(
                        "kafka catcher %s: fetch failed (%s), retry in %.1fs", s.name, exc, delay
                    )
                    await self._sleep_unless_closing(delay)
                    continue
                if failures:
                    log.info("kafka catcher %s: fetching again after %d failures", s.name, failures)
                    failures = 0
                if self._stopping.is_set():
                    self._rewind(batch)
                else:
                    self._process(batch)
        except Exception:
            log.exception("kafka catcher %s: fetch loop failed", s.name)
            raise

    def _process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Hand a fetched batch to the sink; on QueueFull give back what was not taken."""
        refused = False
        for tp, records in batch.items():
            if not records:
                continue
            if tp not in self._assigned:  # mid-rebalance: leave them to the partition's owner
                self._give_back(tp, records[0].offset)
                continue
            for record in records:
                if refused or not self._handle(tp, record):
                    refused = True
                    self._give_back(tp, record.offset)
                    break
        if refused:
            self._must_wait_for_room = True

    def _rewind(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Give back a fetched batch untouched: its partitions will be read from its start."""
        for tp, records in batch.items():
            if records:
                self._give_back(tp, records[0].offset)

    def _give_back(self, tp: TopicPartition, offset: int) -> None:
        """Seek ``tp`` back to ``offset`` so that it is fetched again (if still assigned)."""
        if tp in self._consumer.assignment():
            log.debug(
                "kafka catcher %s: %s/%d: will read again from %d",
                self._settings.name,
                tp.topic,
                tp.partition,
                offset,
            )
            self._consumer.seek(tp, offset)

    def _handle(self, tp: TopicPartition, record: Any) -> bool:
        """Decode, route, map and submit one record; False when the sink refused it."""
        try:
            events = decode_kafka_record(
                record.headers,
                record.value,
                plain_id=f"{tp.topic}/{tp.partition}/{record.offset}",
                plain_source=f"kafka:{tp.topic}",
            )
        except DecodeError as exc:
            self._dead_letter(tp, record, DeadLetterReason.UNDECODABLE, exc.reason)
            return True
        targets: list[Target] = []
        times: list[float] = []
        for event in events:
            try:
                routed = self._route(tp.topic, event)
            except Exception as exc:  # noqa: BLE001 - a routing bug must not stop the stream
                reason = f"route raised {type(exc).__name__}: {exc}"
                self._dead_letter(tp, record, DeadLetterReason.UNROUTABLE, reason, decoded=True)
                return True
            if routed is None:
                reason = (
                    f"no manager for event {event.id!r} "
                    f"(type {event.type!r}, source {event.source!r}, topic {tp.topic!r})"
                )
                self._dead_letter(tp, record, DeadLetterReason.UNROUTABLE, reason, decoded=True)
                return True
            manager, mapper = routed
            try:
                mapped = list(mapper(manager, event.to_dict()))
                bad = next((t for t in mapped if not isinstance(t, Target)), None)
                if bad is not None:
                    raise TypeError(f"returned a {type(bad).__name__}, not a Target")
            except Exception as exc:  # noqa: BLE001 - a mapper bug must not stop the stream
                reason = f"mapper of manager {manager!r} raised {type(exc).__name__}: {exc}"
                self._dead_letter(tp, record, DeadLetterReason.MAPPER_ERROR, reason, decoded=True)
                return True
            targets.extend(mapped)
            if event.timestamp is not None:
                times.append(event.timestamp)
        ack = Ack(
            received_at=self._clock(),
            event_time=min(times) if times else None,
            on_done=partial(self._on_ack, tp, record.offset),
        )
        self._tracker.track(tp, record.offset)
        try:
            self._sink.submit(targets, ack)
        except QueueFullError:
            self._tracker.untrack(tp, record.offset)
            return False
        self.counters.received += 1
        self.counters.decoded += 1
        self.counters.submitted += 1
        return True

    def _on_ack(self, tp: TopicPartition, offset: int, _ack: Ack | None = None) -> None:
        if self._tracker.ack(tp, offset):
            self.counters.acknowledged += 1
        self._acked.set()

    # -- backpressure and stopping --------------------------------------------

    async def _hold(self) -> None:
        """Pause every partition and keep polling (the member stays in its group).

        Returns once the sink has room again (after at least one poll).  Once
        intake is stopped it holds, paused and polling, until closing.
        """
        s = self._settings
        self._set_paused(True)
        loop = asyncio.get_running_loop()
        started = loop.time()
        if not self._stopping.is_set():
            self.counters.backpressure_pauses += 1
            log.info(
                "kafka catcher %s: sink full, pausing %d partitions", s.name, len(self._assigned)
            )
        room = asyncio.ensure_future(self._sink.wait_for_room())
        try:
            polled = False
            while not self._closing.is_set():
                if self._stopping.is_set():
                    if not self._intake_stopped.is_set():
                        self._intake_stopped.set()
                        log.info("kafka catcher %s: intake stopped", s.name)
                elif polled and room.done():
                    break
                self._rewind(await self._consumer.getmany(timeout_ms=_ms(s.poll_timeout)))
                polled = True
            if room.done() and not self._closing.is_set():
                room.result()
        finally:
            if not room.done():
                room.cancel()
            self._must_wait_for_room = False
            if not self._closing.is_set():
                self._set_paused(False)
        if not self._closing.is_set():
            log.info(
                "kafka catcher %s: sink has room, resumed after %.1fs",
                s.name,
                loop.time() - started,
            )

    def _set_paused(self, paused: bool) -> None:
        self._paused = paused
        self.counters.paused = paused
        partitions = list(self._consumer.assignment())
        if paused:
            self._consumer.pause(*partitions)
        else:
            self._consumer.resume(*partitions)

    # -- dead letters ----------------------------------------------------------

    def _dead_letter(
        self,
        tp: TopicPartition,
        record: Any,
        reason: DeadLetterReason,
        message: str,
        *,
        decoded: bool = False,
    ) -> None:
        log.warning(
            "kafka catcher %s: %s/%d@%d is %s, dead-lettering: %s",
            self._settings.name,
            tp.topic,
            tp.partition,
            record.offset,
            reason,
            message,
        )
        self.counters.received += 1
        self.counters.decoded += int(decoded)
        self._tracker.track(tp, record.offset)
        task = asyncio.create_task(self._produce_dead_letter(tp, record, reason, message))
        self._dead_letters.add(task)
        task.add_done_callback(self._dead_letters.discard)
        task.add_done_callback(_log_failure)

    async def _produce_dead_letter(
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
                self.counters.dead_letter_errors += 1
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
        self.counters.dead_lettered[reason] += 1
        self._on_ack(tp, record.offset)

    # -- commits and rebalances ------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.commit_interval)
            await self._commit(None)
            self.counters.lag = await self.lag()

    async def _commit(self, partitions: set[TopicPartition] | None) -> None:
        """Commit the committable positions of ``partitions`` (default: assigned) that advanced."""
        async with self._commit_lock:
            chosen = self._assigned if partitions is None else partitions
            offsets = self._tracker.to_commit(chosen)
            if not offsets:
                return
            try:
                await self._consumer.commit(offsets)
            except KafkaError as exc:
                self.counters.commit_errors += 1
                log.warning(
                    "kafka catcher %s: commit of %s failed: %s",
                    self._settings.name,
                    _describe(offsets),
                    exc,
                )
                return
            self._tracker.mark_committed(offsets)
            self.counters.commits += 1
            self.counters.committed.update(offsets)
            log.debug("kafka catcher %s: committed %s", self._settings.name, _describe(offsets))

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        s = self._settings
        self._assigned -= revoked
        if not revoked:
            return
        drained = await self._wait_drained(revoked, s.commit_timeout)
        await self._commit(revoked)
        for tp in sorted(revoked):
            left = self._tracker.in_flight(tp)
            log.info(
                "kafka catcher %s: %s/%d revoked%s",
                s.name,
                tp.topic,
                tp.partition,
                "" if drained or not left else f" with {left} records unacknowledged",
            )
            self.counters.lag.pop(tp, None)
        self._tracker.revoke(revoked)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._assigned |= assigned
        if self._paused and assigned:
            self._consumer.pause(*assigned)
        for tp in sorted(assigned):
            log.info(
                "kafka catcher %s: %s/%d assigned%s",
                self._settings.name,
                tp.topic,
                tp.partition,
                " (paused)" if self._paused else "",
            )

    async def _wait_drained(self, partitions: set[TopicPartition] | None, within: float) -> bool:
        """Wait at most ``within`` s until no record of ``partitions`` (None: all) is in flight."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            self._acked.clear()
            if self._tracker.total_in_flight(partitions) == 0:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._acked.wait(), remaining)
            except TimeoutError:
                return False

    # -- plumbing ----------------------------------------------------------------

    async def _sleep_unless_closing(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), delay)

    def _security(self) -> dict[str, Any]:
        s = self._settings
        options: dict[str, Any] = {"security_protocol": s.security_protocol}
        if s.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = create_ssl_context(
                cafile=s.ssl_cafile, certfile=s.ssl_certfile, keyfile=s.ssl_keyfile
            )
        if s.sasl_mechanism is not None:
            options["sasl_mechanism"] = s.sasl_mechanism
            options["sasl_plain_username"] = s.sasl_username
            if s.sasl_password is not None:
                options["sasl_plain_password"] = s.sasl_password.get_secret_value()
        return options

    async def _close_clients(self) -> None:
        try:
            if self._consumer is not None:
                await self._consumer.stop()
        finally:
            if self._producer is not None:
                await self._producer.stop()


def kafka_catcher(options: Mapping[str, Any], context: CatcherContext) -> KafkaCatcher:
    """The ``refreshd.catchers`` entry point ``kafka``: a catcher from a ``[[catchers]]`` block.

    Routing options (see :func:`~catchers.routing.route_from_options`) choose
    the manager; every other key is a :class:`KafkaSettings` field.
    """
    route = route_from_options(options, context.managers)
    settings = KafkaSettings.model_validate(
        {k: v for k, v in options.items() if k not in ROUTING_OPTIONS}
    )
    return KafkaCatcher(settings, sink=context.sink, route=route, clock=context.clock)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, catcher: KafkaCatcher) -> None:
        self._catcher = catcher

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._catcher._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._catcher._on_assigned(set(assigned))


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


def _label(tp: TopicPartition) -> str:
    return f"{tp.topic}/{tp.partition}"


def _describe(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}/{tp.partition}={pos}" for tp, pos in sorted(offsets.items()))


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("kafka catcher task %s failed", task.get_name(), exc_info=exc)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.wait([task])
