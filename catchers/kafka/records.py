"""Fetched Kafka records -> Target(s) + one Ack each -> the sink, dead letters in offset order.

Flow: **Kafka record -> CloudEvent(s)** -> intake (route, map) -> **Target(s) + RecordAck**
-> batcher (``TargetSink.submit_many``) -> refresh committed -> Ack done -> offset committed.

Guarantees:

* the records of a partition are handed on in offset order, each with its own
  :class:`~catchers.kafka.commits.RecordAck` and its offset tracked before it
  is handed on; the good records of a fetched batch go to the sink in one
  ``submit_many`` call (one room check and one clock reading per batch, not
  per record);
* a record that does not decode, that no manager claims, or whose mapper
  raises (or returns something other than Targets) is never handed on: it is
  dead-lettered, and only once every record before it was taken, so a refusal
  never leaves a dead letter behind a record that will be read again;
* when the sink refuses a record, that record and the rest of the partition's
  batch are untracked and reported back: the caller seeks to it, and they are
  read again.

:func:`map_record` is pure (no I/O, no state): decoding one record, then
routing and mapping its events through :mod:`catchers.intake`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition

from catchers.cloudevents import decode_kafka_record
from catchers.intake import EventRejection, map_event, undecodable
from catchers.kafka.commits import OffsetCommitter, RecordAck
from catchers.kafka.dead_letters import DeadLetterProducer
from catchers.kafka.settings import KafkaCatcherStats
from catchers.routing import Route
from catchers.wire import DecodeError
from daemon.api import Ack, Target, TargetSink

Mapped = tuple[list[Target], float | None]
"""A record's targets and its earliest event time (epoch seconds), if any."""


def map_record(route: Route, tp: TopicPartition, record: Any) -> Mapped | EventRejection:
    """Decode one record and take its events through the intake: targets and event time,
    or why it is rejected (the first of its events that is)."""
    topic = tp.topic
    try:
        events = decode_kafka_record(
            record.headers,
            record.value,
            plain_id=f"{topic}/{tp.partition}/{record.offset}",
            plain_source=f"kafka:{topic}",
        )
    except DecodeError as exc:
        return undecodable(exc)
    where = f", topic {topic!r}"
    if len(events) == 1:  # the common case: one event per record
        event = events[0]
        mapped = map_event(route, topic, event, where=where)
        if isinstance(mapped, EventRejection):
            return mapped
        return mapped, event.timestamp
    targets: list[Target] = []
    times: list[float] = []
    for event in events:
        mapped = map_event(route, topic, event, where=where)
        if isinstance(mapped, EventRejection):
            return mapped
        targets.extend(mapped)
        if event.time is not None:
            times.append(event.time.timestamp())
    return targets, min(times) if times else None


class RecordIntake:
    """Hands fetched records to the sink, dead-lettering the bad ones, in offset order."""

    def __init__(
        self,
        *,
        route: Route,
        sink: TargetSink,
        commits: OffsetCommitter,
        dead_letters: DeadLetterProducer,
        counters: KafkaCatcherStats,
        clock: Callable[[], float],
    ) -> None:
        self._route = route
        self._sink = sink
        self._commits = commits
        self._dead_letters = dead_letters
        self._counters = counters
        self._clock = clock

    def take(self, tp: TopicPartition, records: list[Any]) -> int | None:
        """Hand on ``records`` (one partition's, in offset order).

        Returns None when all were taken (or dead-lettered), else the offset
        of the first record the sink refused: it and the following ones were
        not taken and must be read again.
        """
        route, on_done = self._route, self._commits.on_ack_done
        received_at = self._clock()  # one fetch: the records arrived together
        events: list[tuple[list[Target], Ack]] = []
        offsets: list[int] = []
        for record in records:
            mapped = map_record(route, tp, record)
            if isinstance(mapped, EventRejection):
                refused = self._submit(tp, events, offsets)
                if refused is not None:
                    return refused
                events, offsets = [], []
                self._dead_letter(tp, record, mapped)
                continue
            targets, event_time = mapped
            offset = record.offset
            ack = RecordAck(
                tp, offset, received_at=received_at, event_time=event_time, on_done=on_done
            )
            events.append((targets, ack))
            offsets.append(offset)
        return self._submit(tp, events, offsets)

    def _submit(
        self, tp: TopicPartition, events: list[tuple[list[Target], Ack]], offsets: list[int]
    ) -> int | None:
        if not events:
            return None
        self._commits.track(tp, offsets)  # first: an ack may resolve within submit_many
        taken = self._sink.submit_many(events)
        counters = self._counters
        counters.received += taken
        counters.decoded += taken
        counters.submitted += taken
        counters.skipped += sum(1 for targets, _ in events[:taken] if not targets)
        if taken == len(events):
            return None
        self._commits.untrack(tp, offsets[taken:])
        return offsets[taken]

    def _dead_letter(self, tp: TopicPartition, record: Any, rejection: EventRejection) -> None:
        self._counters.received += 1
        self._counters.decoded += int(rejection.decoded)
        self._commits.track(tp, (record.offset,))
        self._dead_letters.send(tp, record, rejection.reason, rejection.message)
