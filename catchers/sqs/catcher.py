"""The SQS catcher: long-polls a queue and turns its messages into Targets.

Flow: **SQS message -> CloudEvent -> route -> EventMapper -> Target(s) + Ack**
-> batcher (``TargetSink``) -> refresh committed -> Ack done -> message deleted.

Guarantees (each kept by the module named):

* at-least-once: a message is deleted only once every one of its targets was
  committed; until then its visibility timeout is renewed, so it is not
  delivered twice meanwhile (:mod:`catchers.sqs.leases`).  A message whose
  Ack never resolves is never deleted: it becomes visible again.
* bad input never stops the queue: a message that does not decode, that no
  manager claims, or whose mapper raises is left to the queue's redrive policy
  (made visible at once so that SQS counts its receives and moves it to the
  dead-letter queue), or deleted with ``delete_poison``.  A queue without a
  RedrivePolicy is refused at start unless ``delete_poison`` is set: a poison
  message would otherwise be received forever (:mod:`catchers.sqs.receiving`).
* backpressure: no receive while the batcher is full; messages received are
  held, not given back (:mod:`catchers.sqs.receiving`).
* bodies: structured CloudEvents, plain JSON (EventBridge events), either in
  an SNS envelope (:mod:`catchers.sqs.messages`).

Shutdown is two-phase (``daemon.model.catcher.Catcher``): :meth:`SqsCatcher.stop`
ends the long polls (pending messages stay pending, their visibility still
renewed); :meth:`SqsCatcher.close` deletes the messages whose Acks are done,
stops renewing, makes the others visible again (they are received again:
at-least-once) and closes the client.  Settings and counters:
:mod:`catchers.sqs.settings`; the AWS client and error classes: :mod:`catchers.sqs.client`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any

from catchers.options import settings_from
from catchers.routing import ROUTING_OPTIONS, Route, route_from_options
from catchers.sqs.client import SqsQueueError, classify, explain, open_client, read_queue
from catchers.sqs.leases import LeaseKeeper
from catchers.sqs.receiving import Receiver
from catchers.sqs.settings import SqsCatcherStats, SqsSettings
from daemon.api import CatcherContext, ManagedCatcher, TargetSink

__all__ = ["SqsCatcher", "SqsCatcherStats", "SqsQueueError", "SqsSettings", "create"]

log = logging.getLogger(__name__)


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    FAILED = "failed"
    """start() failed."""
    CLOSED = "closed"


class SqsCatcher(ManagedCatcher):
    """Receives from ``settings.queue_url`` and feeds ``sink`` (a daemon ``Catcher``)."""

    def __init__(
        self,
        settings: SqsSettings,
        *,
        sink: TargetSink,
        route: Route,
        clock: Callable[[], float],
    ) -> None:
        self.name = settings.name
        self.counters = SqsCatcherStats()
        """Live counters (read them, do not write them)."""
        self._settings = settings
        self._sink = sink
        self._route = route
        self._clock = clock
        self._keeper = LeaseKeeper(settings, self.counters)
        self._receiver: Receiver | None = None
        self._stack = AsyncExitStack()
        self._state = State.NEW

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open the client, check the queue, start receiving (idempotent).

        Raises :class:`SqsQueueError` when the queue does not exist, access is
        denied, or it has no redrive policy and ``delete_poison`` is not set.
        """
        if self._state is not State.NEW:
            return
        s = self._settings
        try:
            try:
                client = await self._stack.enter_async_context(open_client(s))
            except Exception as exc:
                if classify(exc) is None:
                    raise
                raise SqsQueueError(explain(exc, s)) from exc
            queue = await read_queue(client, s)
            if queue.max_receive_count is None and not s.delete_poison:
                raise SqsQueueError(
                    f"sqs catcher {s.name}: queue {s.queue_name} has no RedrivePolicy, so a"
                    " message that cannot be decoded, routed or mapped would be received"
                    f" forever. Add a RedrivePolicy to queue {s.queue_name} (a dead-letter"
                    " queue and maxReceiveCount), or set delete_poison = true to log and"
                    " delete such messages"
                )
        except BaseException:
            self._state = State.FAILED
            await self._stack.aclose()
            raise
        self._keeper.start(client)
        self._receiver = Receiver(
            s,
            sink=self._sink,
            route=self._route,
            keeper=self._keeper,
            counters=self.counters,
            clock=self._clock,
            queue=queue,
        )
        self._receiver.start(client)
        self._state = State.RUNNING
        log.info(
            "sqs catcher %s: receiving from %s (%d loop(s), visibility %gs, %s)",
            s.name,
            s.queue_url,
            s.concurrency,
            s.visibility_timeout,
            "poison deleted"
            if s.delete_poison
            else f"poison to {queue.dead_letter_arn} after {queue.max_receive_count} receives",
        )

    async def stop(self) -> None:
        """Receive no more; returns once nothing more is handed to the sink.

        Pending messages stay pending (their visibility is still renewed) so
        that :meth:`close` can delete those whose targets get committed meanwhile.
        """
        if self._receiver is not None:
            await self._receiver.stop()

    async def close(self) -> None:
        """Delete the acknowledged messages, release the others, close the client (idempotent)."""
        if self._state in (State.CLOSED, State.FAILED):
            return
        started = self._state is State.RUNNING
        self._state = State.CLOSED
        try:
            await self.stop()
            if started:
                await self._keeper.close()
        finally:
            await self._stack.aclose()
            log.info("sqs catcher %s: closed", self.name)

    # -- observation ---------------------------------------------------------

    def healthy(self) -> bool:
        """False before start, when start failed, and once the queue was lost (gone,
        access denied) or a background loop died."""
        receiver = self._receiver
        if receiver is None or receiver.crashed():
            return False
        if self._state is State.CLOSED:
            return True
        return self._keeper.running() and (receiver.running() or receiver.stopped)

    def stats(self) -> SqsCatcherStats:
        """The live counters (``poisoned`` and ``dead_lettered`` keyed by reason)."""
        self.counters.in_flight = self._keeper.in_flight()
        return self.counters


def create(options: Mapping[str, Any], context: CatcherContext) -> SqsCatcher:
    """The ``refreshd.catchers`` entry point ``sqs``: a catcher from a ``[[catchers]]`` block.

    Routing options (see :func:`~catchers.routing.route_from_options`; ``managers``
    is keyed by queue URL) choose the manager; every other key is an
    :class:`SqsSettings` field.  Raises ValueError on bad options; does no I/O.
    """
    settings = settings_from(SqsSettings, options, "sqs catcher options", skip=ROUTING_OPTIONS)
    try:
        route = route_from_options(options, context.managers)
    except ValueError as exc:
        raise ValueError(f"sqs catcher {settings.name}: {exc}") from None
    return SqsCatcher(settings, sink=context.sink, route=route, clock=context.clock)
