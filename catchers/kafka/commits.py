"""The Kafka catcher's commit and rebalance bookkeeping: which offsets may be committed.

Flow: Kafka record -> Target(s) + **RecordAck** (offset tracked) -> batcher ->
refresh committed -> **RecordAck done** -> offset committable -> **committed** to the group.

Guarantees:

* at-least-once: a partition's committed offset never passes a record whose
  Ack is not done (:class:`~catchers.kafka.offsets.OffsetTracker`).  An offset is
  tracked *before* its Ack is handed on (an event without targets is done at
  once) and untracked when the sink refused it (it will be read again).
* only positions that advanced are committed, every ``commit_interval`` and on
  demand; a failed commit is counted and logged, and the next one retries it.
* no unbounded wait: every commit (periodic, on revoke, on close) is given at
  most ``commit_timeout`` (aiokafka retries a retriable commit error forever, e.g.
  ``UnknownTopicOrPartition`` after a broker restart without its topics); one
  that runs out counts as failed.  Commits that keep failing with positions
  waiting for ``stall_timeout``, or a commit loop that stops turning, make the
  catcher unhealthy (:meth:`OffsetCommitter.stalled`).
* on revoke, in-flight acks of the revoked partitions are awaited for at most
  ``commit_timeout``, what is committable is committed, and the partitions are
  forgotten: acks that arrive later are ignored (the new owner reads those
  records again).
* a fetch position beyond the partition's highwater (the log was recreated or
  truncated under us) is reported to ``on_out_of_range`` every commit interval
  (:mod:`catchers.kafka.resets` reads the partition again and asks for a full
  refresh); the partition's bookkeeping is then started afresh (:meth:`forget`).

Nothing here fetches or decodes; :class:`~catchers.kafka.KafkaCatcher` owns
the consumer and hands it over at start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from catchers.kafka.offsets import OffsetTracker
from catchers.kafka.settings import KafkaCatcherStats, KafkaSettings
from daemon.api import Ack

log = logging.getLogger(__name__)


class RecordAck(Ack):
    """The Ack of one Kafka record: it knows its partition and offset.

    Every record gets one, so it carries its position itself instead of a
    closure, and its ``on_done`` is one bound method shared by all records.
    """

    __slots__ = ("offset", "partition")

    def __init__(
        self,
        partition: TopicPartition,
        offset: int,
        *,
        received_at: float,
        event_time: float | None,
        on_done: Callable[[Ack], None],
    ) -> None:
        super().__init__(received_at=received_at, event_time=event_time, on_done=on_done)
        self.partition = partition
        self.offset = offset


class OffsetCommitter:
    """Tracks the offsets handed on, and commits the positions their acks made safe."""

    def __init__(self, settings: KafkaSettings, counters: KafkaCatcherStats) -> None:
        self._settings = settings
        self._counters = counters
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._assigned: set[TopicPartition] = set()
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._acked = asyncio.Event()
        self._loop_turned_at: float | None = None
        self._failing_since: float | None = None
        self.on_out_of_range: Callable[[set[TopicPartition]], Awaitable[None]] | None = None
        """Called every commit interval with the partitions whose position is beyond the
        highwater (often none)."""
        self.on_ack_done: Callable[[Ack], None] = self._ack_done
        """The ``on_done`` of every :class:`RecordAck` (one bound method)."""

    # -- lifecycle -------------------------------------------------------------

    def start(self, consumer: Any) -> None:
        """Commit through ``consumer`` every ``commit_interval`` from now on."""
        self._consumer = consumer
        self._task = asyncio.create_task(
            self._commit_loop(), name=f"kafka-commit-{self._settings.name}"
        )
        self._task.add_done_callback(_log_failure)

    async def stop(self) -> None:
        """End the periodic commits (an explicit :meth:`commit` still works)."""
        task = self._task
        for _attempt in range(5):
            if task is None or task.done():
                return
            # Again if need be: a cancellation that lands as an awaited call completes can
            # be lost inside a library's wait_for (Python < 3.12) and the loop would go on.
            task.cancel()
            await asyncio.wait([task], timeout=1.0)
        log.warning("kafka catcher %s: the commit loop did not end", self._settings.name)

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def stalled(self, now: float) -> str | None:
        """Why the commits make no progress (None: they do), seen at loop time ``now``.

        The loop has not turned for ``stall_timeout`` (plus one interval), or every
        commit has failed for ``stall_timeout`` while positions waited to be committed.
        """
        s = self._settings
        turned = self._loop_turned_at
        if turned is not None and now - turned > s.stall_timeout + s.commit_interval:
            return f"commit loop stuck for {now - turned:.0f}s"
        failing = self._failing_since
        if failing is not None and now - failing > s.stall_timeout:
            return f"offset commits failing for {now - failing:.0f}s"
        return None

    # -- tracking ---------------------------------------------------------------

    def is_assigned(self, tp: TopicPartition) -> bool:
        return tp in self._assigned

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._assigned)

    def track(self, tp: TopicPartition, offsets: Sequence[int]) -> None:
        """These records are about to be handed on: hold the position before them."""
        self._tracker.track_many(tp, offsets)

    def untrack(self, tp: TopicPartition, offsets: Sequence[int]) -> None:
        """These records were not taken after all: they will be read again."""
        for offset in reversed(offsets):
            self._tracker.untrack(tp, offset)

    def acknowledge(self, tp: TopicPartition, offset: int) -> None:
        """The record at ``offset`` needs nothing more (refreshed or dead-lettered)."""
        if self._tracker.ack(tp, offset):
            self._counters.acknowledged += 1
        self._acked.set()

    def in_flight(self, partitions: Iterable[TopicPartition] | None = None) -> int:
        """Records handed on and not acknowledged yet (of ``partitions``; None: all)."""
        return self._tracker.total_in_flight(partitions)

    def _ack_done(self, ack: Ack) -> None:
        assert isinstance(ack, RecordAck)
        self.acknowledge(ack.partition, ack.offset)

    # -- committing ----------------------------------------------------------------

    async def commit(self, partitions: set[TopicPartition] | None = None) -> None:
        """Commit the committable positions of ``partitions`` (default: assigned) that advanced."""
        async with self._lock:
            chosen = self._assigned if partitions is None else partitions
            offsets = self._tracker.to_commit(chosen)
            if not offsets:
                if partitions is None:
                    self._failing_since = None  # nothing waits to be committed
                return
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._settings.commit_timeout):
                    await self._consumer.commit(offsets)
            except (KafkaError, TimeoutError) as exc:
                self._counters.commit_errors += 1
                if self._failing_since is None:
                    self._failing_since = loop.time()
                log.warning(
                    "kafka catcher %s: commit of %s failed: %s",
                    self._settings.name,
                    _describe(offsets),
                    f"no answer within {self._settings.commit_timeout:g}s"
                    if isinstance(exc, TimeoutError)
                    else exc,
                )
                return
            if self._failing_since is not None:
                log.info(
                    "kafka catcher %s: committing again after %.1fs of failures",
                    self._settings.name,
                    loop.time() - self._failing_since,
                )
                self._failing_since = None
            self._tracker.mark_committed(offsets)
            self._counters.commits += 1
            self._counters.committed.update({label(tp): pos for tp, pos in offsets.items()})
            log.debug("kafka catcher %s: committed %s", self._settings.name, _describe(offsets))

    async def wait_drained(self, partitions: set[TopicPartition] | None, within: float) -> bool:
        """Wait at most ``within`` s until no record of ``partitions`` (None: all) is in flight."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + within):
                while True:
                    self._acked.clear()
                    if self._tracker.total_in_flight(partitions) == 0:
                        return True
                    await self._acked.wait()
        except TimeoutError:
            return False

    async def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition: the broker's highwater minus our fetch position."""
        return {tp: max(lag, 0) for tp, lag in (await self._lags()).items()}

    async def _lags(self) -> dict[TopicPartition, int]:
        """highwater - position per assigned partition; negative: beyond the log's end."""
        consumer = self._consumer
        result: dict[TopicPartition, int] = {}
        if consumer is None:
            return result
        for tp in consumer.assignment():
            # The consumer's highwater, from the last fetch answer (Tansu's end_offsets()
            # answers the number of batches instead).
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                async with asyncio.timeout(self._settings.poll_timeout):
                    position = await consumer.position(tp)
            except (TimeoutError, KafkaError):
                continue
            result[tp] = highwater - position
        return result

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._loop_turned_at = loop.time()
            await asyncio.sleep(self._settings.commit_interval)
            await self.commit()
            lags = await self._lags()
            self._counters.lag = {label(tp): max(lag, 0) for tp, lag in lags.items()}
            beyond = {tp for tp, lag in lags.items() if lag < 0 and tp in self._assigned}
            if self.on_out_of_range is not None:
                await self.on_out_of_range(beyond)

    # -- rebalances ------------------------------------------------------------------

    def assign(self, assigned: set[TopicPartition]) -> None:
        self._assigned |= assigned

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        """Wait ``commit_timeout`` for the revoked partitions' acks, commit, forget them."""
        s = self._settings
        self._assigned -= revoked
        if not revoked:
            return
        drained = await self.wait_drained(revoked, s.commit_timeout)
        await self.commit(revoked)
        for tp in sorted(revoked):
            left = self._tracker.in_flight(tp)
            log.info(
                "kafka catcher %s: %s/%d revoked%s",
                s.name,
                tp.topic,
                tp.partition,
                "" if drained or not left else f" with {left} records unacknowledged",
            )
            self._counters.lag.pop(label(tp), None)
        self._tracker.revoke(revoked)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Start ``partitions``' bookkeeping afresh (still assigned): their log was replaced,
        acks of records read before are ignored and any position may be committed."""
        self._tracker.revoke(partitions)

    def forget_all(self) -> None:
        """Closing: acks that arrive from now on are ignored."""
        self._tracker.revoke(self._tracker.partitions())


def label(tp: TopicPartition) -> str:
    """``topic/partition``, as in logs and metrics."""
    return f"{tp.topic}/{tp.partition}"


def _describe(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{label(tp)}={pos}" for tp, pos in sorted(offsets.items()))


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("kafka catcher task %s failed", task.get_name(), exc_info=exc)
