"""The batcher: coalesces targets per manager and runs one refresh per manager at a time.

Flow: event -> Target -> **batch (TargetCollection)** -> refresher (collector ->
parser -> persister) -> ack.

Catchers hand targets with an :class:`~daemon.acks.Ack` to :meth:`Batcher.submit`
(the :class:`~daemon.acks.TargetSink` protocol).  Per manager the batcher keeps
one pending batch and follows client-go's coalescing workqueue (DESIGN.md 6-9):

* a target already pending is not added twice: the new ack also waits on it;
* a target arriving while its manager refreshes is kept for the next batch,
  and its ack waits for that batch (never for the one already running);
* a batch is dispatched after ``debounce`` of quiet, at the latest
  ``max_delay`` after its first target arrived, at once at ``max_targets``;
* a batch holding the manager target, or ``full_refresh_threshold`` distinct
  targets, is a full refresh, which absorbs everything queued before it starts;
* one refresh per manager at a time, at most ``workers`` at once overall,
  the manager due the longest goes first;
* a failed refresh keeps its targets and acks, merges them with newer ones and
  is retried with backoff; after ``escalate_after`` consecutive failures the
  retry is a full refresh;
* an ack resolves only when every target it waits on was committed by a refresh
  that started after the target arrived (at-least-once).

The per-manager bookkeeping lives in :mod:`daemon.batches`; retry delays in
:mod:`daemon.backoff`; time in :mod:`daemon.clock`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType, TracebackType

from daemon.acks import Ack, QueueFullError
from daemon.batches import (
    BatcherStats,
    BatchingSettings,
    ManagerState,
    ManagerStatus,
    PendingBatch,
    RefreshAttempt,
    RefreshHooks,
)
from daemon.clock import LOOP_CLOCK, Clock
from daemon.refresh_result import RefreshKind
from daemon.targets import Target, TargetCollection

__all__ = [
    "NO_HOOKS",
    "Batcher",
    "BatcherStats",
    "BatcherStoppedError",
    "BatchingSettings",
    "ManagerStatus",
    "RefreshFn",
    "RefreshHooks",
    "RefreshKind",
]

logger = logging.getLogger(__name__)

RefreshFn = Callable[[TargetCollection], Awaitable[object]]
"""Runs one refresh of a TargetCollection; returns a result for the hooks, raises on failure."""

NO_HOOKS = RefreshHooks()
DEFAULT_SETTINGS = BatchingSettings()
_NO_OVERRIDES: Mapping[str, BatchingSettings] = MappingProxyType({})


class BatcherStoppedError(QueueFullError):
    """The batcher no longer accepts targets (shutting down): answer 503, keep the event."""


class Batcher:
    """Per-manager coalescing queue and refresh scheduler (implements ``TargetSink``).

    Use as ``async with Batcher(...) as batcher:`` or ``start()`` / ``close()``.
    Graceful shutdown: ``stop()`` (refuse new targets) -> ``await flush()`` ->
    ``await drain(grace)`` -> ``await close(cancel=True)``.
    """

    def __init__(
        self,
        refresh: RefreshFn,
        *,
        settings: BatchingSettings = DEFAULT_SETTINGS,
        overrides: Mapping[str, BatchingSettings] = _NO_OVERRIDES,
        clock: Clock = LOOP_CLOCK,
        rng: random.Random | None = None,
        hooks: RefreshHooks = NO_HOOKS,
        may_start: Callable[[str], bool] = lambda _manager: True,
    ) -> None:
        self._refresh = refresh
        self._may_start = may_start
        """Ownership gate (daemon/ownership.py): a due batch of a manager this process
        does not own waits, its targets pending, until :meth:`wake` after it is owned."""
        self._settings = settings
        self._overrides = dict(overrides)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._hooks = hooks
        self._states: dict[str, ManagerState] = {}
        self._running = 0
        self._stopped = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._settled = asyncio.Event()
        """Set whenever a refresh ends (drain looks again)."""
        self.stats = BatcherStats()
        """Live counters (read them, do not write them)."""

    # -- TargetSink ---------------------------------------------------------

    def submit(self, targets: Sequence[Target], ack: Ack) -> None:
        """Queue ``targets``; ``ack`` resolves once each is committed by a later refresh.

        Raises :class:`BatcherStoppedError` after :meth:`stop`, and
        :class:`QueueFullError` (nothing queued) when the pending targets of
        all managers would exceed ``max_pending_targets``.
        """
        if self._stopped:
            raise BatcherStoppedError("the batcher is stopped")
        if not self.submit_many(((targets, ack),)):
            raise QueueFullError(
                f"{self.pending_count()} targets pending "
                f"(max_pending_targets={self._settings.max_pending_targets})"
            )

    def submit_many(self, events: Sequence[tuple[Sequence[Target], Ack]]) -> int:
        """Queue events in order as :meth:`submit` would; returns how many were queued.

        Stops at the first event whose targets would exceed ``max_pending_targets``
        (that event and the following ones are not queued, their acks untouched);
        queues nothing once stopped.  The pending count and the clock are read
        once per call, not once per event.
        """
        if self._stopped:
            return 0
        limit = self._settings.max_pending_targets
        pending = self.pending_count()
        now = self._clock.now()
        queued = enqueued = 0
        for targets, ack in events:
            added = self._queue(targets, ack, now=now, pending=pending, limit=limit)
            if added < 0:
                break
            pending += added
            enqueued += len(targets)
            queued += 1
        if enqueued:
            self.stats.targets_enqueued += enqueued
            self._queued()
        return queued

    def wake(self) -> None:
        """Look at the pending batches again (a manager became ours to refresh)."""
        self._wake.set()

    def has_room(self) -> bool:
        return self.pending_count() < self._settings.max_pending_targets

    async def wait_for_room(self) -> None:
        """Return once :meth:`has_room` is true (or the batcher is stopped)."""
        while not self._stopped and not self.has_room():
            self._room.clear()
            await self._room.wait()

    def request_full(self, manager: str) -> Ack:
        """Queue a full refresh of ``manager`` (scheduler, manual refresh); never QueueFull."""
        if self._stopped:
            raise BatcherStoppedError("the batcher is stopped")
        now = self._clock.now()
        ack = Ack(received_at=now)
        self._queue([Target.full(manager)], ack, now=now, pending=0, limit=None)
        self.stats.targets_enqueued += 1
        self._queued()
        return ack

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start the dispatcher task (idempotent); needs a running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._dispatch_forever(), name="batcher")
            self._task.add_done_callback(_log_crash)

    def stop(self) -> None:
        """Refuse new targets from now on; pending and in-flight work continues."""
        self._stopped = True
        self._room.set()

    async def flush(self) -> None:
        """Dispatch every pending batch now, ignoring debounce and max_delay.

        A manager still refreshing gets its batch as soon as it is free; the
        worker limit and a failing manager's retry delay still apply.
        """
        for state in self._states.values():
            if state.pending:
                state.flush_requested = True
        self._dispatch_due()
        self._wake.set()
        await asyncio.sleep(0)

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 -- on the injected clock
        """Wait (clock time) until nothing is pending or in flight; returns whether it is so.

        Stops waiting early (returning False) once nothing is in flight and every
        batch left belongs to a manager whose retry delay ends after the
        deadline: those could not be refreshed in time anyway (a manager whose
        credentials are refused waits ``retry_max``), and their events stay
        unacknowledged, so they are delivered again.
        """
        deadline = self._clock.now() + timeout
        while not self._idle.is_set():
            if self._only_late_retries_left(deadline):
                return False
            self._settled.clear()
            if not await self._clock.wait_event(self._settled, deadline):
                break
        return self._idle.is_set()

    def _only_late_retries_left(self, deadline: float) -> bool:
        return not self.in_flight_managers() and all(
            state.next_retry_at is not None and state.next_retry_at > deadline
            for state in self._states.values()
            if state.pending
        )

    def waiting_to_retry(self) -> dict[str, int]:
        """Pending targets per manager that is waiting out a retry delay now."""
        now = self._clock.now()
        return {
            state.manager: len(state.pending)
            for state in self._states.values()
            if state.pending and state.next_retry_at is not None and state.next_retry_at > now
        }

    async def close(self, *, cancel: bool = False) -> None:
        """Stop, end the dispatcher and wait for in-flight refreshes.

        With ``cancel=True`` in-flight refreshes are cancelled; their acks stay
        unresolved (the events will be delivered again).
        """
        self.stop()
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        tasks = [state.task for state in self._states.values() if state.task is not None]
        if cancel:
            for task in tasks:
                task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def __aenter__(self) -> Batcher:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(cancel=True)

    # -- observability ------------------------------------------------------

    def pending_count(self, manager: str | None = None) -> int:
        """Distinct pending targets of ``manager``, or of all managers."""
        if manager is not None:
            state = self._states.get(manager)
            return len(state.pending) if state else 0
        return sum(len(state.pending) for state in self._states.values())

    @property
    def running(self) -> bool:
        """The dispatcher task is alive (started, not closed, not crashed)."""
        return self._task is not None and not self._task.done()

    def in_flight_managers(self) -> frozenset[str]:
        return frozenset(m for m, state in self._states.items() if state.in_flight is not None)

    def manager_status(self, manager: str) -> ManagerStatus:
        """A snapshot of one manager (an idle status for a manager never seen)."""
        state = self._states.get(manager) or ManagerState(manager, self.settings_for(manager))
        return state.status()

    def statuses(self) -> list[ManagerStatus]:
        """Snapshots of every manager with overrides or with targets seen so far."""
        names = sorted(set(self._states) | set(self._overrides))
        return [self.manager_status(name) for name in names]

    def settings_for(self, manager: str) -> BatchingSettings:
        return self._overrides.get(manager, self._settings)

    # -- queueing -----------------------------------------------------------

    def _state(self, manager: str) -> ManagerState:
        state = self._states.get(manager)
        if state is None:
            state = self._states[manager] = ManagerState(manager, self.settings_for(manager))
        return state

    def _queue(
        self, targets: Sequence[Target], ack: Ack, *, now: float, pending: int, limit: int | None
    ) -> int:
        """Queue one event (any number of targets and managers), unless it would take the
        ``pending`` targets past ``limit``; returns how many pending targets it added, or
        -1 when it was refused.  The caller counts ``targets_enqueued`` and wakes up."""
        if len(targets) == 1:  # the common case: no grouping, one lookup
            target = targets[0]
            waiting = self._state(target.manager).pending
            if limit is not None and pending >= limit and not waiting.holds(target):
                self.stats.targets_rejected += 1
                return -1
            ack.expect(1)
            if waiting.add_one(target, ack, now=now):
                return 1
            self.stats.targets_coalesced += 1
            return 0
        if not targets:
            ack.resolve_if_empty()
            return 0
        by_manager: dict[str, list[Target]] = {}
        for target in targets:
            by_manager.setdefault(target.manager, []).append(target)
        if limit is not None:
            growth = sum(self._state(m).growth(batch) for m, batch in by_manager.items())
            if growth > 0 and pending + growth > limit:
                self.stats.targets_rejected += len(targets)
                return -1
        ack.expect(len(targets))
        added = 0
        for manager, batch in by_manager.items():
            pending_batch = self._state(manager).pending
            for target in batch:
                if pending_batch.add_one(target, ack, now=now):
                    added += 1
                else:
                    self.stats.targets_coalesced += 1
        return added

    def _queued(self) -> None:
        """Targets were queued: the batcher is busy, and the dispatcher must look."""
        self._idle.clear()
        self._wake.set()

    # -- dispatching --------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            self._wake.clear()
            deadline = self._dispatch_due()
            await self._clock.wait_event(self._wake, deadline)

    def _dispatch_due(self) -> float | None:
        """Start every due batch a worker is free for; returns the next deadline."""
        if self._closed:
            return None
        now = self._clock.now()
        due = sorted(
            (when, state.manager, state)
            for state in self._states.values()
            if (when := state.due_at()) is not None
        )
        for when, _, state in due:
            if when > now:
                return when if self._running < self._settings.workers else None
            if self._running >= self._settings.workers:
                return None
            if not self._may_start(state.manager):
                continue
            self._start(state, now)
        return None

    def _start(self, state: ManagerState, now: float) -> None:
        batch = state.take_pending()
        threshold = state.settings.full_refresh_threshold
        run = RefreshAttempt(
            kind=RefreshKind.FULL if batch.is_full(threshold) else RefreshKind.TARGETED,
            collection=batch.collection(threshold),
            targets=len(batch),
            attempt=state.failures + 1,
            started_at=now,
        )
        self.stats.batches_dispatched[run.kind] += 1
        self._running += 1
        logger.debug(
            "%s: dispatching %s refresh of %d targets (attempt %d)",
            state.manager,
            run.kind.value,
            run.targets,
            run.attempt,
        )
        state.task = asyncio.create_task(
            self._run_refresh(state, batch, run), name=f"refresh {state.manager}"
        )
        self._room.set()
        self._guard(state.manager, lambda: self._hooks.on_start(state.manager, run.collection))

    async def _run_refresh(
        self, state: ManagerState, batch: PendingBatch, run: RefreshAttempt
    ) -> None:
        try:
            result = await self._refresh(run.collection)
        except asyncio.CancelledError:
            state.restore(batch)
            raise
        except Exception as exc:  # noqa: BLE001 -- any error fails the run; logged in _failed
            self._failed(state, batch, run, exc)
        else:
            self._succeeded(state, batch, run, result)
        finally:
            state.in_flight = None
            state.task = None
            self._running -= 1
            self._wake.set()
            self._settled.set()
            if self.pending_count() == 0 and not self.in_flight_managers():
                self._idle.set()

    def _succeeded(
        self, state: ManagerState, batch: PendingBatch, run: RefreshAttempt, result: object
    ) -> None:
        now = self._clock.now()
        self.stats.refresh_successes[run.kind] += 1
        log = logger.info if state.failures else logger.debug
        log(
            "%s: %s refresh of %d targets done in %.3fs (after %d failures)",
            state.manager,
            run.kind.value,
            run.targets,
            now - run.started_at,
            state.failures,
        )
        state.succeeded(now)
        batch.commit()
        self._guard(
            state.manager, lambda: self._hooks.on_success(state.manager, run.collection, result)
        )

    def _failed(
        self, state: ManagerState, batch: PendingBatch, run: RefreshAttempt, exc: Exception
    ) -> None:
        now = self._clock.now()
        self.stats.refresh_failures[run.kind] += 1
        settings = state.settings
        failures = state.failures + 1
        retry_at = now + settings.backoff.delay_after(exc, failures, rng=self._rng)
        escalate = run.kind is RefreshKind.TARGETED and failures >= settings.escalate_after
        state.failed(batch, exc, now=now, retry_at=retry_at, escalate=escalate)
        if escalate:
            self.stats.escalations += 1
        log = logger.warning if failures == 1 or escalate else logger.debug
        log(
            "%s: %s refresh of %d targets failed (%d in a row: %s), retrying%s in %.1fs",
            state.manager,
            run.kind.value,
            run.targets,
            failures,
            exc,
            " as a full refresh" if escalate else "",
            retry_at - now,
            exc_info=failures == 1,
        )
        self._guard(
            state.manager, lambda: self._hooks.on_failure(state.manager, run.collection, exc)
        )

    @staticmethod
    def _guard(manager: str, call_hook: Callable[[], None]) -> None:
        """Run a hook; a broken hook is logged and never stops the batcher."""
        try:
            call_hook()
        except Exception:
            logger.exception("%s: refresh hook failed", manager)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.critical("batcher dispatcher crashed; no refresh will start", exc_info=exc)
