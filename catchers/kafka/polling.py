"""The Kafka catcher's poll loop: fetch, hand over, and hold still while the sink is full.

Flow: broker -> **getmany (one fetched batch)** -> catchers.kafka.records (Target(s) +
one Ack per record) -> batcher; refused or unwanted records are sought back to.

Guarantees:

* backpressure without leaving the group: while the sink has no room every
  assigned partition is paused and ``getmany`` keeps being called (every
  ``poll_timeout``), so the member keeps polling within ``max_poll_interval``.
  A record the sink refused is read again (its partition is sought back to
  it), and so is whatever was fetched while holding or after intake stopped.
* stopping is two-phase: :meth:`PollLoop.stop_intake` returns once nothing
  more is handed to the sink, but the loop goes on polling, paused, so that
  the member stays in its group until :meth:`PollLoop.close`.
* retriable fetch errors are retried after ``fetch_backoff``; errors about
  positions (no committed offset, out of range) go to
  :class:`~catchers.kafka.resets.OffsetResets`; any other error ends the loop
  (and the catcher reports itself unhealthy).  Every poll is stamped, so a loop
  that stops polling for ``stall_timeout`` is reported unhealthy too.

Scheduling: ``getmany`` does not suspend while aiokafka holds buffered
records, so a backlog is taken in in slices of what one fetch buffered (at
most ``max_partition_fetch_bytes``, 1 MiB, per partition) before the
dispatcher, the refreshes and the heartbeats run again.  Taking a backlog in
first coalesces it into fewer refreshes: yielding after every batch measured
slower (bench/pipeline.py phase B), as the intake then straddles more refreshes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from catchers.kafka.commits import OffsetCommitter
from catchers.kafka.records import RecordIntake
from catchers.kafka.resets import OffsetResets
from catchers.kafka.settings import KafkaCatcherStats, KafkaSettings, milliseconds
from daemon.api import TargetSink

log = logging.getLogger(__name__)

FETCH_MAX_WAIT_MS = 50
"""How long the broker may hold a fetch that found no record.  Apache Kafka answers
a waiting fetch as soon as a record arrives, so there this only bounds an idle
fetch (20 cheap requests a second); brokers that do not (Tansu, the test and
bench broker) answer only after the wait, which with aiokafka's default of 500 ms
added 140 ms p50 (250 ms p90) to every event's latency, measured on this machine
(50 ms: 15 ms p50)."""


class PollLoop:
    """Runs ``getmany`` and hands each fetched batch to the intake, pausing when told to."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        sink: TargetSink,
        intake: RecordIntake,
        commits: OffsetCommitter,
        resets: OffsetResets,
        counters: KafkaCatcherStats,
    ) -> None:
        self._settings = settings
        self._resets = resets
        self._polled_at: float | None = None
        self._sink = sink
        self._intake = intake
        self._commits = commits
        self._counters = counters
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._intake_stopped = asyncio.Event()
        self._closing = asyncio.Event()
        self._paused = False
        self._must_wait_for_room = False

    # -- lifecycle -------------------------------------------------------------

    def start(self, consumer: Any) -> None:
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name=f"kafka-fetch-{self._settings.name}")

    async def stop_intake(self) -> None:
        """Hand nothing more to the sink; returns once that holds (the loop keeps polling)."""
        self._stopping.set()
        task = self._task
        if task is None or task.done():
            return
        stopped = asyncio.create_task(self._intake_stopped.wait())
        try:
            await asyncio.wait([stopped, task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()

    async def close(self) -> None:
        """End the loop (it stops polling) and wait for it."""
        self._closing.set()
        task = self._task
        if task is not None:
            await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # logged by the loop itself; mark it retrieved

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def stalled(self, now: float) -> str | None:
        """Why the loop makes no progress (None: it polls), seen at loop time ``now``."""
        polled = self._polled_at
        if polled is not None and now - polled > self._settings.stall_timeout:
            return f"no poll for {now - polled:.0f}s"
        return None

    def failed(self) -> bool:
        """The loop ended with an error."""
        task = self._task
        return task is not None and task.done() and not task.cancelled() and bool(task.exception())

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """New partitions stay paused while the loop holds."""
        if self._paused and assigned:
            self._consumer.pause(*assigned)

    @property
    def paused(self) -> bool:
        return self._paused

    # -- fetching ----------------------------------------------------------------

    async def _run(self) -> None:
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
                    batch = await self._poll(
                        timeout_ms=milliseconds(s.poll_timeout), max_records=s.max_poll_records
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

    async def _poll(self, **options: Any) -> dict[TopicPartition, list[Any]]:
        """One ``getmany``, stamped; errors about positions are answered by the resets."""
        loop = asyncio.get_running_loop()
        if self._polled_at is None:
            self._polled_at = loop.time()
        try:
            batch: dict[TopicPartition, list[Any]] = await self._consumer.getmany(**options)
        except KafkaError as exc:
            if not await self._resets.handle(exc):
                raise
            batch = {}
        self._polled_at = loop.time()
        return batch

    def _process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Hand a fetched batch to the sink; on QueueFull give back what was not taken."""
        refused = False
        for tp, records in batch.items():
            if not records:
                continue
            if refused or not self._commits.is_assigned(tp):
                # after a refusal, or mid-rebalance (the partition's owner reads them)
                self._give_back(tp, records[0].offset)
                continue
            first_refused = self._intake.take(tp, records)
            if first_refused is not None:
                refused = True
                self._give_back(tp, first_refused)
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

    # -- backpressure and stopping -------------------------------------------------

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
            self._counters.backpressure_pauses += 1
            log.info(
                "kafka catcher %s: sink full, pausing %d partitions",
                s.name,
                len(self._commits.assignment()),
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
                self._rewind(await self._poll(timeout_ms=milliseconds(s.poll_timeout)))
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
        self._counters.paused = paused
        partitions = list(self._consumer.assignment())
        if paused:
            self._consumer.pause(*partitions)
        else:
            self._consumer.resume(*partitions)

    async def _sleep_unless_closing(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._closing.wait()
