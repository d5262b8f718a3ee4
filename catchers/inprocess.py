"""The in-process catcher: reads the event log of an embedded simulator, with a cursor.

Flow: **embedded cloud's event log -> event** -> intake (EventMapper) -> **Target(s) + Ack**
-> batcher (``TargetSink``) -> refresh -> persister.

This is the event source of ``refreshd run`` without a config: the manager's
provider connection serves an in-process cloud (``connection.cloud``), and
this catcher pulls its events in order with a cursor, the sequence number of
the last event handed to the batcher.  Guarantees:

* nothing is lost: the cursor only moves past an event once the batcher took
  its targets (or once it was deliberately skipped, dropped or refused by the
  mapper).  When the batcher is full the same event is offered again after
  ``wait_for_room`` (backpressure; the log simply grows meanwhile).
* when the cloud's log no longer holds the events after the cursor (they
  left its window), the catcher asks for a full refresh of the manager.
* new events wake the loop at once (``cloud.subscribe``); ``poll_interval``
  is only a safety net.
* ``drop_rate`` drops that share of events on purpose (seeded, so a run
  replays), to exercise the periodic full refresh; drops are counted.

The cloud is reached through the connection object at runtime and only
through the small :class:`EventLog` protocol: catchers never import providers.
The cursor lives in memory: the embedded cloud is rebuilt on restart anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from catchers.intake import EventRejection, apply_mapper
from catchers.options import settings_from
from catchers.routing import DeadLetterReason
from daemon.api import (
    Ack,
    BatcherStoppedError,
    CatcherContext,
    CatcherStats,
    Duration,
    EventMapper,
    ManagedCatcher,
    QueueFullError,
    Target,
    TargetSink,
)

log = logging.getLogger(__name__)

_RETRY_DELAYS = (0.01, 0.05, 0.25, 1.0)
"""Seconds between offers of an event the sink refused although it reported room."""


class EventsPage(Protocol):
    """One read of the log (the simulator's ``EventsPage``)."""

    @property
    def events(self) -> Sequence[Mapping[str, Any]]: ...
    @property
    def latest(self) -> int: ...
    @property
    def truncated(self) -> bool: ...


@runtime_checkable
class EventLog(Protocol):
    """What this catcher needs of an embedded cloud."""

    @property
    def last_sequence(self) -> int: ...

    def events_after(self, after: int, *, limit: int = ...) -> EventsPage: ...

    def subscribe(self, callback: Callable[[Any], None]) -> Callable[[], None]: ...


class InProcessSettings(BaseModel):
    """One in-process catcher (a ``[[catchers]]`` block with ``type = "inprocess"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manager: str
    """The manager whose embedded cloud is read (its events are its own)."""
    name: str = "inprocess"
    """The catcher's name in logs and metrics."""
    drop_rate: float = Field(0.0, ge=0, le=1)
    """Share of events dropped on purpose (0..1), to exercise the periodic full refresh."""
    seed: int = 0
    """Seed of the generator that decides which events are dropped."""
    batch_size: int = Field(500, ge=1)
    """Events read from the log at a time."""
    poll_interval: Duration = Field(1.0, gt=0)
    """Seconds between reads of an idle log when no wake-up came (a safety net)."""


@dataclass(slots=True)
class InProcessStats(CatcherStats):
    """The in-process catcher's counters since start.

    ``received``: events read from the log (an event offered again after QueueFull counts
    once); ``decoded``: events mapped to targets (possibly none); ``dead_lettered``: events
    the mapper refused (logged and passed over: there is no dead-letter store); ``lag``:
    events after the cursor, keyed by manager.
    """

    dead_lettered: dict[str, int] = field(
        default_factory=lambda: {str(DeadLetterReason.MAPPER_ERROR): 0}
    )
    dropped: int = 0
    """Events dropped on purpose (``drop_rate``)."""
    lost: int = 0
    """Events that left the log's window before they were read (a full refresh was queued)."""
    backpressure_waits: int = 0
    cursor: int = 0
    """Sequence number of the last event handled (updated when read)."""


class InProcessCatcher(ManagedCatcher):
    """Pulls ``log``'s events after a cursor into ``sink`` (a daemon ``Catcher``)."""

    def __init__(
        self,
        settings: InProcessSettings,
        *,
        log_: EventLog,
        mapper: EventMapper,
        sink: TargetSink,
        clock: Callable[[], float],
    ) -> None:
        self.name = settings.name
        self.counters = InProcessStats()
        """Live counters (read them, do not write them)."""
        self.cursor = 0
        """Sequence number of the last event handled (submitted, skipped or dropped)."""
        self._settings = settings
        self._log = log_
        self._mapper = mapper
        self._sink = sink
        self._clock = clock
        self._rng = random.Random(settings.seed)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    # -- Catcher --------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None or self._stopped:
            return
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self._log.subscribe(self._on_event)
        self._task = asyncio.create_task(self._run(), name=f"inprocess-{self.name}")
        log.info(
            "inprocess catcher %s: reading the events of manager %s after #%d",
            self.name,
            self._settings.manager,
            self.cursor,
        )

    async def stop(self) -> None:
        """Stop reading; the event being offered stays unread (the cursor is before it)."""
        if self._stopped:
            return
        self._stopped = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        log.info("inprocess catcher %s: stopped at #%d", self.name, self.cursor)

    async def close(self) -> None:
        await self.stop()

    def healthy(self) -> bool:
        task = self._task
        return task is None or not task.done()

    def stats(self) -> InProcessStats:
        self.counters.cursor = self.cursor
        self.counters.lag = {self._settings.manager: max(0, self._log.last_sequence - self.cursor)}
        return self.counters

    # -- the loop -------------------------------------------------------------------

    def _on_event(self, _event: Any) -> None:
        """Subscriber callback, called inside the cloud's mutation: only wake the loop."""
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                page = self._log.events_after(self.cursor, limit=self._settings.batch_size)
                if page.truncated:
                    await self._lost(page)
                if not page.events:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._settings.poll_interval):
                            await self._wake.wait()
                    continue
                for event in page.events:
                    await self._handle(event)
                await asyncio.sleep(0)  # a long backlog must not starve the loop
        except BatcherStoppedError:
            log.info("inprocess catcher %s: the batcher stopped; reading stops", self.name)
        except Exception:
            log.exception("inprocess catcher %s: loop failed at #%d", self.name, self.cursor)
            raise

    async def _handle(self, event: Mapping[str, Any]) -> None:
        sequence = int(event["sequence"])
        self.counters.received += 1
        if self._settings.drop_rate and self._rng.random() < self._settings.drop_rate:
            self.counters.dropped += 1
            self.cursor = sequence
            return
        targets = apply_mapper(self._settings.manager, self._mapper, dict(event))
        if isinstance(targets, EventRejection):  # the policy: log it and pass the event over
            self.counters.dead_lettered[targets.reason] += 1
            log.warning(
                "inprocess catcher %s: event #%d (%s) refused by the mapper of %s: %s",
                self.name,
                sequence,
                event.get("type"),
                self._settings.manager,
                targets.error,
                exc_info=None if isinstance(targets.error, ValueError) else targets.error,
            )
            self.cursor = sequence
            return
        self.counters.decoded += 1
        await self._offer(targets, _epoch(event.get("time")))
        if not targets:
            self.counters.skipped += 1
        self.cursor = sequence

    async def _lost(self, page: EventsPage) -> None:
        first = int(page.events[0]["sequence"]) if page.events else page.latest + 1
        missed = max(0, first - self.cursor - 1)
        self.counters.lost += missed
        log.warning(
            "inprocess catcher %s: %d event(s) after #%d left the log unread; "
            "queueing a full refresh of %s",
            self.name,
            missed,
            self.cursor,
            self._settings.manager,
        )
        await self._offer([Target.full(self._settings.manager)], None)
        self.cursor = first - 1

    async def _offer(self, targets: Sequence[Target], event_time: float | None) -> None:
        """Submit until the sink takes it; waits for room under backpressure."""
        refused = 0
        while True:
            ack = Ack(received_at=self._clock(), event_time=event_time, on_done=self._acknowledged)
            try:
                self._sink.submit(targets, ack)
            except BatcherStoppedError:
                raise
            except QueueFullError:
                self.counters.backpressure_waits += 1
                if self._sink.has_room():
                    # the sink reports room but this event needs more: do not spin
                    await asyncio.sleep(_RETRY_DELAYS[min(refused, len(_RETRY_DELAYS) - 1)])
                    refused += 1
                else:
                    await self._sink.wait_for_room()
                continue
            self.counters.submitted += 1
            return

    def _acknowledged(self, _ack: Ack) -> None:
        self.counters.acknowledged += 1


def create(options: Mapping[str, Any], context: CatcherContext) -> InProcessCatcher:
    """The ``refreshd.catchers`` entry point ``inprocess``; raises ValueError on bad options."""
    settings = settings_from(InProcessSettings, options, "inprocess catcher options")
    endpoint = context.managers.get(settings.manager)
    if endpoint is None:
        known = ", ".join(sorted(context.managers)) or "none"
        raise ValueError(
            f"inprocess catcher: unknown manager {settings.manager!r} (configured: {known})"
        )
    if endpoint.connection is None:
        # check-config builds catchers before any provider connection exists: the
        # options are valid; whether the endpoint is embedded is known once it is open
        return InProcessCatcher(
            settings,
            log_=_NoEvents(),
            mapper=endpoint.mapper,
            sink=context.sink,
            clock=context.clock,
        )
    cloud = getattr(endpoint.connection, "cloud", None)
    if cloud is None:
        raise ValueError(
            f"inprocess catcher needs an embedded endpoint: manager {settings.manager!r} "
            "has no in-process cloud"
        )
    if not isinstance(cloud, EventLog):
        raise ValueError(
            f"inprocess catcher: the cloud of manager {settings.manager!r} has no event log"
        )
    return InProcessCatcher(
        settings, log_=cloud, mapper=endpoint.mapper, sink=context.sink, clock=context.clock
    )


@dataclass(frozen=True, slots=True)
class _EmptyPage:
    events: Sequence[Mapping[str, Any]] = ()
    latest: int = 0
    truncated: bool = False


class _NoEvents:
    """The log of a catcher built for checking only (never started)."""

    @property
    def last_sequence(self) -> int:
        return 0

    def events_after(self, after: int, *, limit: int = 0) -> EventsPage:
        return _EmptyPage()

    def subscribe(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        return lambda: None


def _epoch(value: Any) -> float | None:
    """An RFC 3339 ``time`` as epoch seconds (None when absent or unreadable)."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
