"""The webhook catcher: CloudEvents POSTed over HTTP, answered once their targets are committed.

Flow: **HTTP request -> CloudEvent(s)** -> intake (route, map) -> **Target(s) + Ack**
-> batcher (``TargetSink``) -> refresh committed -> Ack done -> **200**.

The catcher adds ``POST <path>`` (default ``/events``) to the daemon's HTTP
app.  It takes the three CloudEvents HTTP content modes: binary (``ce-*``
headers, the body is the data), structured (``application/cloudevents+json``)
and batch (``application/cloudevents-batch+json``).

Answers, and what the sender should do:

* **200** only after every target of every event of the request is committed
  (one Ack per event; DESIGN.md 7).  An event that maps to no target is
  accepted at once and counted as skipped.
* **400** with the reason for a malformed event, an event no manager claims,
  or one the provider's mapper refuses (``ValueError``).  A batch is accepted
  whole or not at all: one bad event rejects the request.
* **401** without the bearer token (``token`` option, else the ``[http]`` token).
* **413** when the body is larger than ``max_body_bytes``.
* **503** with ``Retry-After`` when the batcher has no room (nothing of a
  single event is queued; a batch is refused whole when the batcher reports
  no room before it is submitted), when the catcher is stopping, when the
  targets were not committed within ``max_wait`` (they stay queued: a retry
  is harmless), and when the catcher closes while the request waits.
* **500** when the mapper fails with anything but ``ValueError``, returns
  something other than Targets, or the route raises (a bug).

Shutdown is two-phase (``daemon.model.catcher.Catcher``): after :meth:`stop` new
requests get 503 while requests already waiting keep waiting for their
commit; :meth:`close` answers every request still waiting with 503, so its
sender delivers the events again (at-least-once).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from catchers.cloudevents import CloudEvent
from catchers.intake import EventRejection, map_event, undecodable
from catchers.options import settings_from
from catchers.routing import DeadLetterReason, Route, first_route, route_by_attribute
from catchers.webhook.requests import Outcome, Waiter, decode_request
from catchers.webhook.settings import WebhookSettings, WebhookStats
from catchers.wire import DecodeError
from daemon.api import (
    Ack,
    CatcherContext,
    EventMapper,
    ManagedCatcher,
    ManagerEndpoint,
    QueueFullError,
    Target,
    TargetSink,
    bearer_ok,
    unauthorized,
)

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    CLOSED = "closed"


class _Rejected(Exception):
    """A request refused before anything was queued."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class WebhookCatcher(ManagedCatcher):
    """Receives CloudEvents on ``POST settings.path`` of ``app`` (a daemon ``Catcher``)."""

    def __init__(
        self,
        settings: WebhookSettings,
        *,
        sink: TargetSink,
        route: Route,
        clock: Callable[[], float],
        token: str | None,
    ) -> None:
        self.name = settings.name
        self.counters = WebhookStats()
        """Live counters (read them, do not write them)."""
        self._settings = settings
        self._sink = sink
        self._route = route
        self._clock = clock
        self._token = token
        self._state = State.NEW
        self._waiters: set[Waiter] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def install(self, app: web.Application) -> None:
        """Add the route to ``app`` (before the app starts)."""
        try:
            app.router.add_post(self._settings.path, self.handle)
        except RuntimeError as exc:
            raise ValueError(
                f"webhook {self.name}: cannot add POST {self._settings.path}: {exc}"
            ) from None

    # -- Catcher --------------------------------------------------------------------

    async def start(self) -> None:
        if self._state is State.NEW:
            self._state = State.RUNNING
            log.info("webhook %s: accepting events on POST %s", self.name, self._settings.path)

    async def stop(self) -> None:
        if self._state in (State.NEW, State.RUNNING):
            self._state = State.STOPPING
            log.info(
                "webhook %s: refusing new events; %d request(s) wait for their commit",
                self.name,
                len(self._waiters),
            )

    async def close(self) -> None:
        if self._state is State.CLOSED:
            return
        self._state = State.CLOSED
        if self._waiters:
            log.info(
                "webhook %s: closing; %d waiting request(s) answered 503 (senders will retry)",
                self.name,
                len(self._waiters),
            )
        for waiter in list(self._waiters):
            waiter.abandon()
        await self._idle.wait()

    def healthy(self) -> bool:
        return self._state is not State.CLOSED

    def stats(self) -> WebhookStats:
        self.counters.waiting = len(self._waiters)
        return self.counters

    # -- the request ----------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        if not bearer_ok(request, self._token):
            self.counters.unauthorized += 1
            return unauthorized()
        try:
            self._require_running()
            body = await self._read_body(request)
            pairs = self._decode_and_map(request, body)
            self._require_running()
            acks = self._submit(pairs)
        except _Rejected as rejected:
            if rejected.status == 503:
                self.counters.busy += 1
                return self._unavailable(rejected.reason)
            return web.json_response({"error": rejected.reason}, status=rejected.status)
        outcome = await self._wait_committed(acks)
        if outcome is Outcome.TIMED_OUT:
            return self._unavailable(
                f"targets not committed within max_wait ({self._settings.max_wait:g}s); "
                "they stay queued, retry later"
            )
        if outcome is Outcome.CLOSED:
            return self._unavailable("shutting down before the targets were committed; retry")
        self.counters.committed += 1
        targets = sum(len(targets) for _, targets in pairs)
        return web.json_response({"status": "committed", "events": len(pairs), "targets": targets})

    def _require_running(self) -> None:
        if self._state is not State.RUNNING:
            reason = "not started yet" if self._state is State.NEW else "shutting down"
            raise _Rejected(503, f"webhook {self.name} is {reason}")

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self._settings.max_body_bytes
        too_large = _Rejected(413, f"body larger than {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            self.counters.too_large += 1
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > limit:
                self.counters.too_large += 1
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _decode_and_map(
        self, request: web.Request, body: bytes
    ) -> list[tuple[CloudEvent, list[Target]]]:
        try:
            events = decode_request(request, body)
        except DecodeError as exc:
            self.counters.received += 1
            raise self._refuse(undecodable(exc), "") from None
        self.counters.received += len(events)
        pairs = []
        for index, event in enumerate(events):
            targets = map_event(self._route, self._settings.path, event)
            if isinstance(targets, EventRejection):
                where = f"event {event.id!r}" if len(events) == 1 else f"batch item {index}"
                raise self._refuse(targets, where, event)
            pairs.append((event, targets))
        self.counters.decoded += len(pairs)
        return pairs

    def _refuse(
        self, rejection: EventRejection, where: str, event: CloudEvent | None = None
    ) -> _Rejected:
        """The policy: 400 with the reason; 500 for a route or mapper bug (logged)."""
        manager = rejection.manager
        if rejection.bug:
            self.counters.mapper_failures += int(manager is not None)
            if rejection.returned is not None:
                detail = f"mapper of manager {manager!r} returned a {rejection.returned}"
            elif manager is None:  # the route raised
                detail = rejection.message
            else:
                log.warning(
                    "webhook %s: mapper of manager %s failed on %s",
                    self.name,
                    manager,
                    where,
                    exc_info=rejection.error,
                )
                detail = f"mapper of manager {manager!r} failed: {rejection.error}"
            return _Rejected(500, f"{where}: {detail}")
        if rejection.reason is DeadLetterReason.UNROUTABLE and event is not None:
            detail = f"{where}: no manager for source {event.source!r}"
        elif rejection.reason is DeadLetterReason.MAPPER_ERROR:
            detail = f"{where}: rejected by the mapper of manager {manager!r}: {rejection.error}"
        else:
            detail = rejection.message
        self.counters.dead_lettered[rejection.reason] += 1
        log.debug("webhook %s: refused (%s): %s", self.name, rejection.reason.value, detail)
        return _Rejected(400, detail)

    def _submit(self, pairs: Sequence[tuple[CloudEvent, list[Target]]]) -> list[Ack]:
        """One Ack per event; on QueueFull nothing more is queued and the request gets 503."""
        if len(pairs) > 1 and not self._sink.has_room():
            raise _Rejected(503, "the refresh queue is full; retry the batch later")
        acks: list[Ack] = []
        for index, (event, targets) in enumerate(pairs):
            ack = Ack(received_at=self._clock(), event_time=event.timestamp)
            try:
                self._sink.submit(targets, ack)
            except QueueFullError as exc:
                detail = f" after {index} of {len(pairs)} events" if index else ""
                raise _Rejected(503, f"refresh queue full{detail} ({exc}); retry later") from None
            acks.append(ack)
            self.counters.submitted += 1
            if not targets:
                self.counters.skipped += 1
        return acks

    async def _wait_committed(self, acks: Sequence[Ack]) -> Outcome:
        waiter = Waiter(acks)
        if waiter.future.done():
            return Outcome.COMMITTED
        self._waiters.add(waiter)
        self._idle.clear()
        try:
            async with asyncio.timeout(self._settings.max_wait):
                committed = await waiter.future
        except TimeoutError:
            self.counters.timed_out += 1
            return Outcome.TIMED_OUT
        finally:
            self._waiters.discard(waiter)
            if not self._waiters:
                self._idle.set()
        if not committed:
            self.counters.closed_waiting += 1
            return Outcome.CLOSED
        return Outcome.COMMITTED

    def _unavailable(self, reason: str) -> web.Response:
        return web.json_response(
            {"error": reason},
            status=503,
            headers={"Retry-After": str(self._settings.retry_after)},
        )


def create(options: Mapping[str, Any], context: CatcherContext) -> WebhookCatcher:
    """The ``refreshd.catchers`` entry point ``webhook``: a catcher from a ``[[catchers]]`` block.

    Adds ``POST <path>`` to ``context.http_app``; raises ValueError on bad options.
    """
    settings = settings_from(WebhookSettings, options, "webhook catcher options")
    if context.http_app is None:
        raise ValueError(f"webhook {settings.name}: the daemon's HTTP endpoint is not available")
    token = settings.token.reveal() if settings.token is not None else context.token
    catcher = WebhookCatcher(
        settings,
        sink=context.sink,
        route=_route(settings, context.managers),
        clock=context.clock,
        token=token,
    )
    catcher.install(context.http_app)
    return catcher


def _route(settings: WebhookSettings, managers: Mapping[str, ManagerEndpoint]) -> Route:
    def endpoint(name: str) -> tuple[str, EventMapper]:
        if name not in managers:
            known = ", ".join(sorted(managers)) or "none"
            raise ValueError(
                f"webhook {settings.name}: unknown manager {name!r} (configured: {known})"
            )
        return (name, managers[name].mapper)

    routes: list[Route] = []
    if settings.routes:
        table = {source: endpoint(manager) for source, manager in settings.routes.items()}
        routes.append(route_by_attribute("source", table))
    if settings.manager is not None:
        single = endpoint(settings.manager)
        routes.append(lambda stream, event: single)
    return first_route(*routes)
