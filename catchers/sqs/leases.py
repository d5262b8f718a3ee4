"""The SQS catcher's received messages: kept invisible while pending, deleted once committed.

Flow: SQS message received -> **Lease** -> Target(s) + **MessageAck** -> batcher ->
refresh committed -> Ack done -> **DeleteMessageBatch**.

A :class:`Lease` is one received message the catcher answers for, from its
receipt until it is deleted or made visible again.  Guarantees:

* at-least-once: a message is deleted only once its Ack is done (every target
  committed), or when it asked for nothing (skipped), or when it is poison and
  ``delete_poison`` is set.  A message whose Ack never resolves is never deleted.
* while the catcher holds a lease its message stays invisible: the visibility
  timeout is renewed when less than a third of it is left, in
  ChangeMessageVisibilityBatch calls of up to 10.  A renewal SQS refuses for
  good (the receipt expired, the 12 h limit) is logged once; the message will
  be received again (harmless: refreshes are idempotent).
* deletes go out in DeleteMessageBatch calls of up to 10 (up to
  ``PARALLEL_CALLS`` calls at once); failed entries are retried with
  ``delete_backoff``, then logged and given up.
* a release waits for the renewal round in flight, so that a renewal sent
  before it cannot make the message invisible again after it.
* :meth:`LeaseKeeper.release` makes messages visible again at once
  (visibility 0): poison left to the redrive policy, messages not taken in.
* :meth:`LeaseKeeper.close` deletes what is done within ``drain_timeout``, stops
  renewing, and releases the rest: they are received again (by this daemon
  after a restart, or another one).

Visibility deadlines are on the event loop's clock (SQS counts real seconds),
kept in a heap: renewing costs O(log n) per message, whatever the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from catchers.sqs.client import PARALLEL_CALLS, classify
from catchers.sqs.settings import SqsCatcherStats, SqsSettings
from daemon.api import Ack

log = logging.getLogger(__name__)

BATCH = 10
"""Entries per SQS batch call (the API's limit)."""
_LOST_CODES = frozenset({"ReceiptHandleIsInvalid", "MessageNotInflight", "InvalidParameterValue"})
"""Renewal errors that will not get better: the receipt is no longer valid."""


class LeaseState(enum.Enum):
    HELD = "held"
    """Received, not taken by the batcher yet (no room)."""
    PENDING = "pending"
    """Taken by the batcher; its Ack is not done."""
    DELETING = "deleting"
    """Done with: waiting for (or retrying) its delete."""


@dataclass(slots=True, eq=False)
class Lease:
    message_id: str
    receipt_handle: str
    renew_at: float
    """Loop time at which the visibility timeout must be renewed."""
    state: LeaseState = LeaseState.HELD
    lost: bool = False
    """SQS refused a renewal for good: the message may be received again."""
    delete_attempts: int = 0
    delete_at: float = 0.0
    """Loop time of the next delete attempt."""


class MessageAck(Ack):
    """The Ack of one SQS message: it knows its lease."""

    __slots__ = ("lease",)

    def __init__(
        self,
        lease: Lease,
        *,
        received_at: float,
        event_time: float | None,
        on_done: Callable[[Ack], None],
    ) -> None:
        super().__init__(received_at=received_at, event_time=event_time, on_done=on_done)
        self.lease = lease


class LeaseKeeper:
    """Holds the catcher's received messages: renews, deletes and releases them."""

    def __init__(self, settings: SqsSettings, counters: SqsCatcherStats) -> None:
        self._settings = settings
        self._counters = counters
        self._client: Any = None
        self._leases: dict[str, Lease] = {}
        """By receipt handle."""
        self._renewals: list[tuple[float, int, Lease]] = []
        """A heap of (renew_at, sequence, lease); entries whose lease was renewed, deleted
        or released since are skipped when they come up."""
        self._sequence = itertools.count()
        self._deletions: list[Lease] = []
        self._renewals_changed = asyncio.Event()
        self._deletions_changed = asyncio.Event()
        self._renewals_idle = asyncio.Event()
        self._renewals_idle.set()
        """No renewal round in flight: a release waits for it, so that a renewal sent
        before it cannot land after it."""
        self._calls = asyncio.Semaphore(PARALLEL_CALLS)
        self._renewer: asyncio.Task[None] | None = None
        self._deleter: asyncio.Task[None] | None = None
        self._closing = False
        self._name = settings.name

    # -- lifecycle -------------------------------------------------------------

    def start(self, client: Any) -> None:
        self._client = client
        self._renewer = asyncio.create_task(self._renew_loop(), name=f"sqs-renew-{self._name}")
        self._deleter = asyncio.create_task(self._delete_loop(), name=f"sqs-delete-{self._name}")

    def running(self) -> bool:
        tasks = (self._renewer, self._deleter)
        return all(task is not None and not task.done() for task in tasks)

    async def close(self) -> None:
        """Delete what is done (within ``drain_timeout``), stop renewing, release the rest."""
        if self._closing:
            return
        self._closing = True
        self._deletions_changed.set()
        await _cancel(self._renewer)
        deleter = self._deleter
        if deleter is not None:
            done, _ = await asyncio.wait([deleter], timeout=self._settings.drain_timeout)
            if not done:
                await _cancel(deleter)
        undeleted = [lease for lease in self._leases.values() if lease.state is LeaseState.DELETING]
        if undeleted:
            log.warning(
                "sqs catcher %s: closing with %d acknowledged messages not deleted; they will"
                " be received again",
                self._name,
                len(undeleted),
            )
        pending = [
            lease for lease in self._leases.values() if lease.state is not LeaseState.DELETING
        ]
        if pending:
            log.info(
                "sqs catcher %s: closing with %d messages not acknowledged; made visible again",
                self._name,
                len(pending),
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.drain_timeout):
                    await self.release(pending)
        self._leases.clear()
        self._deletions.clear()

    # -- leases --------------------------------------------------------------------

    def add(self, message: dict[str, Any], *, arrived: float) -> Lease:
        """Answer for a message received at loop time ``arrived``."""
        lease = Lease(
            str(message.get("MessageId", "")),
            message["ReceiptHandle"],
            renew_at=arrived + self._settings.visibility_timeout * 2 / 3,
        )
        self._leases[lease.receipt_handle] = lease
        if not self._renewals:  # the renewer may be waiting with no deadline
            self._renewals_changed.set()
        self._schedule_renewal(lease)
        return lease

    def ack(self, lease: Lease, *, received_at: float, event_time: float | None) -> MessageAck:
        """The Ack of ``lease``'s message: once done, the message is deleted."""
        return MessageAck(
            lease, received_at=received_at, event_time=event_time, on_done=self._ack_done
        )

    def taken(self, leases: Iterable[Lease]) -> None:
        """The batcher took these messages: they wait for their Acks."""
        for lease in leases:
            if lease.state is LeaseState.HELD:
                lease.state = LeaseState.PENDING

    def delete(self, lease: Lease) -> None:
        """Delete ``lease``'s message (soon, in a batch)."""
        if self._closing or self._leases.get(lease.receipt_handle) is not lease:
            return
        lease.state = LeaseState.DELETING
        lease.delete_at = 0.0
        self._deletions.append(lease)
        self._deletions_changed.set()

    async def release(self, leases: Sequence[Lease]) -> None:
        """Make these messages visible again now (their receive counts toward the redrive)."""
        for lease in leases:
            self._leases.pop(lease.receipt_handle, None)
        await self._renewals_idle.wait()
        answered = await self._change_visibility(leases, 0, what="release")
        self._counters.released += len(answered)

    def in_flight(self) -> int:
        return len(self._leases)

    def _ack_done(self, ack: Ack) -> None:
        assert isinstance(ack, MessageAck)
        self._counters.acknowledged += 1
        self.delete(ack.lease)

    # -- renewing ------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        loop = asyncio.get_running_loop()
        heap = self._renewals
        while True:
            self._renewals_changed.clear()
            now = loop.time()
            due: list[Lease] = []
            while heap and heap[0][0] <= now:
                at, _, lease = heapq.heappop(heap)
                if lease.renew_at == at and not lease.lost and lease.receipt_handle in self._leases:
                    due.append(lease)
            if due:
                await self._renew(due)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(heap[0][0] - now if heap else None):
                    await self._renewals_changed.wait()

    async def _renew(self, due: list[Lease]) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._settings.visibility_timeout
        sent = loop.time()
        self._renewals_idle.clear()
        try:
            renewed = await self._change_visibility(due, int(timeout), what="renew")
        finally:
            self._renewals_idle.set()
        retry_at = loop.time() + min(1.0, timeout / 6)
        for lease in due:
            if lease in renewed:
                lease.renew_at = sent + timeout * 2 / 3
            elif lease.lost:
                continue
            else:
                lease.renew_at = retry_at
            self._schedule_renewal(lease)
        self._counters.visibility_extensions += len(renewed)

    def _schedule_renewal(self, lease: Lease) -> None:
        heapq.heappush(self._renewals, (lease.renew_at, next(self._sequence), lease))

    async def _change_visibility(
        self, leases: Sequence[Lease], seconds: int, *, what: str
    ) -> set[Lease]:
        """ChangeMessageVisibilityBatch on ``leases``; returns those SQS accepted."""
        chunks = [leases[i : i + BATCH] for i in range(0, len(leases), BATCH)]
        accepted: set[Lease] = set()
        for answered in await asyncio.gather(
            *(self._change_chunk(chunk, seconds, what=what) for chunk in chunks)
        ):
            accepted |= answered
        return accepted

    async def _change_chunk(self, chunk: Sequence[Lease], seconds: int, *, what: str) -> set[Lease]:
        renewing = what == "renew"
        async with self._calls:
            if renewing:  # not one released or deleted meanwhile
                chunk = [lease for lease in chunk if lease.receipt_handle in self._leases]
            if not chunk:
                return set()
            entries = [
                {"Id": str(i), "ReceiptHandle": lease.receipt_handle, "VisibilityTimeout": seconds}
                for i, lease in enumerate(chunk)
            ]
            answer = await self._call(
                "change_message_visibility_batch", entries, what=f"{what} {len(chunk)}"
            )
        if answer is None:
            return set()
        for failed in answer.get("Failed", ()):
            lease = chunk[int(failed["Id"])]
            self._counters.errors += 1
            if failed.get("Code") in _LOST_CODES and renewing:
                lease.lost = True
                log.warning(
                    "sqs catcher %s: cannot renew the visibility of message %s (%s: %s);"
                    " it may be received again",
                    self._name,
                    lease.message_id,
                    failed.get("Code"),
                    failed.get("Message"),
                )
            else:
                log.debug(
                    "sqs catcher %s: %s message %s failed: %s",
                    self._name,
                    what,
                    lease.message_id,
                    failed,
                )
        return {chunk[int(ok["Id"])] for ok in answer.get("Successful", ())}

    # -- deleting ------------------------------------------------------------------

    async def _delete_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._deletions_changed.clear()
            now = loop.time()
            closing = self._closing
            due = [lease for lease in self._deletions if closing or lease.delete_at <= now]
            if due:
                due_set = set(due)
                self._deletions = [lease for lease in self._deletions if lease not in due_set]
                await asyncio.gather(
                    *(self._delete(due[i : i + BATCH]) for i in range(0, len(due), BATCH))
                )
                continue
            if closing and not self._deletions:
                return
            next_at = min((lease.delete_at for lease in self._deletions), default=None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if next_at is None else next_at - now):
                    await self._deletions_changed.wait()

    async def _delete(self, chunk: list[Lease]) -> None:
        entries = [
            {"Id": str(i), "ReceiptHandle": lease.receipt_handle} for i, lease in enumerate(chunk)
        ]
        async with self._calls:
            answer = await self._call("delete_message_batch", entries, what=f"delete {len(chunk)}")
        if answer is None:
            failed = list(chunk)
        else:
            deleted = [chunk[int(ok["Id"])] for ok in answer.get("Successful", ())]
            for lease in deleted:
                self._leases.pop(lease.receipt_handle, None)
            self._counters.deleted += len(deleted)
            failed = []
            for entry in answer.get("Failed", ()):
                self._counters.errors += 1
                lease = chunk[int(entry["Id"])]
                failed.append(lease)
                log.debug(
                    "sqs catcher %s: delete of %s failed: %s", self._name, lease.message_id, entry
                )
        self._retry_deletes(failed)

    def _retry_deletes(self, failed: list[Lease]) -> None:
        backoff = self._settings.delete_backoff
        now = asyncio.get_running_loop().time()
        for lease in failed:
            lease.delete_attempts += 1
            if lease.delete_attempts > len(backoff):
                self._leases.pop(lease.receipt_handle, None)
                self._counters.delete_failures += 1
                log.warning(
                    "sqs catcher %s: giving up deleting message %s after %d attempts; it will be"
                    " received and refreshed again",
                    self._name,
                    lease.message_id,
                    lease.delete_attempts,
                )
                continue
            lease.delete_at = now + backoff[lease.delete_attempts - 1]
            self._deletions.append(lease)
        if failed:
            self._deletions_changed.set()

    # -- plumbing --------------------------------------------------------------------

    async def _call(self, operation: str, entries: list[dict[str, Any]], *, what: str) -> Any:
        """One batch call; None when it failed as a whole (counted and logged)."""
        try:
            return await getattr(self._client, operation)(
                QueueUrl=self._settings.queue_url, Entries=entries
            )
        except Exception as exc:
            if classify(exc) is None:
                raise
            self._counters.errors += 1
            log.warning("sqs catcher %s: %s failed: %s", self._name, what, exc)
            return None


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait([task])
