"""The SQS catcher's receive loops: long polls, hand messages on, hold still while full.

Flow: SQS -> **ReceiveMessage (long poll)** -> catchers.sqs.messages (Target(s)) ->
**Lease + MessageAck** -> batcher (``TargetSink.submit_many``); poison -> released
to the redrive policy (or deleted with ``delete_poison``); no targets -> deleted.

Guarantees:

* backpressure never costs a receive: no ReceiveMessage is made while the
  sink has no room, and messages already received that the sink refuses are
  held (their visibility renewed) and handed on as soon as there is room,
  not given back to the queue, where every receive counts toward the redrive
  policy's maxReceiveCount.
* poison (undecodable, unroutable, refused by its mapper) is counted by
  reason, logged once per receive, and made visible again at once, so that
  SQS counts its receives quickly and moves it to the dead-letter queue after
  maxReceiveCount; with ``delete_poison`` it is logged with its body and deleted.
* stopping: :meth:`Receiver.stop` cuts the long polls short and returns once
  nothing more is handed on; messages received but not handed on are made
  visible again.
* failures: throttling, server and network errors (after botocore's own
  retries) are retried with ``receive_backoff``; a missing queue or denied
  access ends the loops and is reported by :attr:`Receiver.fatal`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from catchers.intake import EventRejection
from catchers.routing import Route
from catchers.sqs.client import AwsFailure, QueueInfo, classify, explain
from catchers.sqs.leases import Lease, LeaseKeeper, MessageAck
from catchers.sqs.messages import map_message
from catchers.sqs.settings import SqsCatcherStats, SqsSettings
from daemon.api import Target, TargetSink

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTRIBUTES = ["ApproximateReceiveCount", "SentTimestamp"]
BODY_LOGGED = 1000
"""Characters of a poison message's body logged when it is deleted."""
HELD_RETRY = 0.5
"""Seconds between attempts to hand on a message the sink refuses although it reports room
(an event with more targets than ``max_pending_targets``, or a stopped batcher)."""


class Receiver:
    """``concurrency`` receive loops feeding the sink."""

    def __init__(
        self,
        settings: SqsSettings,
        *,
        sink: TargetSink,
        route: Route,
        keeper: LeaseKeeper,
        counters: SqsCatcherStats,
        clock: Callable[[], float],
        queue: QueueInfo,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._route = route
        self._keeper = keeper
        self._counters = counters
        self._clock = clock
        self._queue = queue
        self._client: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._paused = 0
        self.fatal: str | None = None
        """Why the loops ended (the queue went missing, access denied), else None."""

    # -- lifecycle -------------------------------------------------------------

    def start(self, client: Any) -> None:
        self._client = client
        self._tasks = [
            asyncio.create_task(self._run(), name=f"sqs-receive-{self._settings.name}-{i}")
            for i in range(self._settings.concurrency)
        ]

    async def stop(self) -> None:
        """Hand nothing more on; returns once the loops have ended."""
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(self._tasks)

    @property
    def stopped(self) -> bool:
        """:meth:`stop` was called."""
        return self._stopping.is_set()

    def running(self) -> bool:
        return bool(self._tasks) and all(not task.done() for task in self._tasks)

    def crashed(self) -> bool:
        """A loop ended with an error (a fatal AWS error, or a bug)."""
        return self.fatal is not None or any(
            task.done() and not task.cancelled() and task.exception() is not None
            for task in self._tasks
        )

    # -- the loop --------------------------------------------------------------------

    async def _run(self) -> None:
        s = self._settings
        failures = 0
        try:
            while not self._stopping.is_set():
                if not self._sink.has_room():
                    await self._wait_for_room()
                    continue
                try:
                    answer = await self._unless_stopping(self._receive())
                except Exception as exc:
                    failure = classify(exc)
                    if failure is None:
                        raise
                    if failure is AwsFailure.FATAL:
                        self.fatal = explain(exc, s)
                        log.error("%s; stopped receiving", self.fatal)
                        return
                    delay = s.receive_backoff[min(failures, len(s.receive_backoff) - 1)]
                    failures += 1
                    log.log(
                        logging.WARNING if failures == 1 else logging.DEBUG,
                        "sqs catcher %s: receive failed (%s), retry in %.1fs",
                        s.name,
                        exc,
                        delay,
                    )
                    self._counters.errors += 1
                    await self._unless_stopping(asyncio.sleep(delay))
                    continue
                if failures:
                    log.info("sqs catcher %s: receiving again after %d failures", s.name, failures)
                    failures = 0
                if answer is not None:
                    await self._take(answer)
        except Exception:
            log.exception("sqs catcher %s: receive loop failed", s.name)
            raise

    async def _receive(self) -> tuple[list[dict[str, Any]], float]:
        s = self._settings
        answer = await self._client.receive_message(
            QueueUrl=s.queue_url,
            MaxNumberOfMessages=s.max_messages,
            WaitTimeSeconds=int(s.wait_time),
            VisibilityTimeout=int(s.visibility_timeout),
            AttributeNames=ATTRIBUTES,
            MessageAttributeNames=["All"],
        )
        return list(answer.get("Messages") or ()), asyncio.get_running_loop().time()

    async def _take(self, answer: tuple[list[dict[str, Any]], float]) -> None:
        """Hand a receive's messages on (poison released, skipped ones deleted)."""
        messages, arrived = answer
        keeper, counters, s = self._keeper, self._counters, self._settings
        if self._stopping.is_set():  # received as the catcher stopped: not handed on
            counters.received += len(messages)
            await keeper.release([keeper.add(message, arrived=arrived) for message in messages])
            return
        received_at = self._clock()
        events: list[tuple[list[Target], MessageAck]] = []
        poison: list[Lease] = []
        for message in messages:
            counters.received += 1
            lease = keeper.add(message, arrived=arrived)
            mapped = map_message(self._route, s.queue_url, message, queue_name=s.queue_name)
            if isinstance(mapped, EventRejection):
                counters.decoded += int(mapped.decoded)
                if self._poison(lease, message, mapped):
                    poison.append(lease)
                continue
            counters.decoded += 1
            if not mapped.targets:
                counters.skipped += 1
                keeper.delete(lease)
                continue
            ack = keeper.ack(lease, received_at=received_at, event_time=mapped.event_time)
            events.append((mapped.targets, ack))
        if poison:
            await keeper.release(poison)
        await self._submit(events)

    async def _submit(self, events: list[tuple[list[Target], MessageAck]]) -> None:
        """Hand ``events`` on in order, waiting for room; released if stopped meanwhile."""
        while events:
            taken = self._sink.submit_many(events)
            if taken:
                self._counters.submitted += taken
                self._keeper.taken(ack.lease for _, ack in events[:taken])
                events = events[taken:]
                continue
            if self._stopping.is_set():
                await self._keeper.release([ack.lease for _, ack in events])
                return
            if self._sink.has_room():  # refused with room: do not spin
                await self._unless_stopping(asyncio.sleep(HELD_RETRY))
            else:
                await self._wait_for_room()

    def _poison(self, lease: Lease, message: Mapping[str, Any], rejection: EventRejection) -> bool:
        """Count and log a poison message; True when it must be released to the redrive policy."""
        counters, s = self._counters, self._settings
        reason = rejection.reason
        counters.poisoned[reason] += 1
        if s.delete_poison:
            counters.dead_lettered[reason] += 1
            log.warning(
                "sqs catcher %s: message %s is poison (%s: %s); deleting it (delete_poison)."
                " Body: %.*s",
                s.name,
                lease.message_id,
                reason,
                rejection.message,
                BODY_LOGGED,
                message.get("Body"),
            )
            self._keeper.delete(lease)
            return False
        attributes = message.get("Attributes") or {}
        receives = int(attributes.get("ApproximateReceiveCount", 0) or 0)
        limit = self._queue.max_receive_count or 0
        last = receives >= limit
        if last:
            counters.dead_lettered[reason] += 1
        log.warning(
            "sqs catcher %s: message %s is poison (%s: %s); receive %d of %d, %s",
            s.name,
            lease.message_id,
            reason,
            rejection.message,
            receives,
            limit,
            f"the redrive policy moves it to {self._queue.dead_letter_arn}"
            if last
            else "released for the redrive policy",
        )
        return True

    # -- waiting -----------------------------------------------------------------------

    async def _wait_for_room(self) -> None:
        counters = self._counters
        counters.backpressure_pauses += 1
        self._paused += 1
        counters.paused = True
        log.debug("sqs catcher %s: batcher full, receiving paused", self._settings.name)
        try:
            await self._unless_stopping(self._sink.wait_for_room())
            if not self._sink.has_room():  # a stopped batcher does not wait: do not spin
                await self._unless_stopping(asyncio.sleep(HELD_RETRY))
        finally:
            self._paused -= 1
            counters.paused = self._paused > 0

    async def _unless_stopping(self, awaitable: Awaitable[T]) -> T | None:
        """``await awaitable``, cut short (cancelled, None) once stopping.

        A receive cut short may already have taken messages off the queue: they stay
        invisible for their visibility timeout, then are received again.
        """
        if self._stopping.is_set():
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            return None
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not work.done():
                work.cancel()
                await asyncio.wait([work])
        if work.cancelled():
            return None
        return work.result()
