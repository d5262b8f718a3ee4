"""Acknowledgement handles: how a catcher learns that an event is safe to forget.

Flow: event -> Target(s) + **Ack** -> batcher -> refresher commits -> **Ack done**
-> catcher commits the offset / deletes the message / answers the webhook.

One :class:`Ack` stands for one received event.  The catcher hands it to the
batcher with the event's targets; the batcher resolves it once *every* one of
those targets has been saved by a committed refresh that started after the
target arrived (at-least-once, DESIGN.md 7).  An event that produced no
targets is acknowledged at once.  An Ack is never resolved by a failed
refresh: the targets are retried and the Ack waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from daemon.model.targets import Target


class Ack:
    """Completion of one event: done when all of its targets are committed.

    Catchers create one per event and it lives until the event's refresh
    commits, so an Ack is small: ``on_done`` and the first callback added (the
    metrics') have slots of their own, and a list is only made for more.
    """

    __slots__ = (
        "_also",
        "_callbacks",
        "_done",
        "_future",
        "_on_done",
        "_remaining",
        "event_time",
        "received_at",
    )

    def __init__(
        self,
        *,
        received_at: float,
        event_time: float | None = None,
        on_done: Callable[[Ack], None] | None = None,
    ) -> None:
        self.received_at = received_at
        """Loop time when the catcher received the event."""
        self.event_time = event_time
        """Wall-clock (epoch seconds) time the cloud stamped on the event, if it had one."""
        self._remaining = 0
        self._done = False
        self._on_done = on_done
        self._also: Callable[[Ack], None] | None = None
        self._callbacks: list[Callable[[Ack], None]] | None = None
        self._future: asyncio.Future[None] | None = None

    @property
    def done(self) -> bool:
        return self._done

    def expect(self, count: int = 1) -> None:
        """Record that ``count`` more targets must be committed before this Ack is done."""
        if self._done:
            raise RuntimeError("Ack already resolved")
        self._remaining += count

    def target_committed(self) -> None:
        """One of the expected targets was committed."""
        if self._done:
            return
        self._remaining -= 1
        if self._remaining <= 0:
            self._resolve()

    def resolve_if_empty(self) -> None:
        """Resolve now when no target is expected (an event that produced no targets)."""
        if not self._done and self._remaining <= 0:
            self._resolve()

    def add_done_callback(self, callback: Callable[[Ack], None]) -> None:
        """Call ``callback(ack)`` once done (at once when already done), after ``on_done``."""
        if self._done:
            callback(self)
        elif self._also is None:
            self._also = callback
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    async def wait(self) -> None:
        """Wait until every target of this event is committed."""
        if self._done:
            return
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._future)

    def _resolve(self) -> None:
        self._done = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        on_done, also, callbacks = self._on_done, self._also, self._callbacks
        self._on_done = self._also = self._callbacks = None
        if on_done is not None:
            on_done(self)
        if also is not None:
            also(self)
        if callbacks is not None:
            for callback in callbacks:
                callback(self)


class QueueFullError(Exception):
    """The batcher holds ``max_pending_targets``: the catcher must slow down (backpressure)."""


class TargetSink(Protocol):
    """What catchers hand events to (the batcher)."""

    def submit(self, targets: Sequence[Target], ack: Ack) -> None:
        """Queue ``targets`` for refresh; ``ack`` resolves once all are committed.

        Raises :class:`QueueFullError` when the pending queue is full; nothing is
        queued then, and the caller keeps the event.  ``submit([], ack)`` resolves
        ``ack`` at once.
        """
        ...

    def submit_many(self, events: Sequence[tuple[Sequence[Target], Ack]]) -> int:
        """Queue several events in order, as :meth:`submit` would one by one.

        Returns how many were queued, always a prefix of ``events``: it stops
        at the first event that does not fit (at once when the sink is
        stopped).  That event and those after it are not queued and their acks
        are untouched; the caller keeps them.  Never raises QueueFullError.
        """
        ...

    def has_room(self) -> bool:
        """False while the pending queue is at ``max_pending_targets``."""
        ...

    async def wait_for_room(self) -> None:
        """Return once :meth:`has_room` is true."""
        ...
