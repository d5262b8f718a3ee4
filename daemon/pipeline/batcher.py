"""The batcher: coalesces targets per manager and runs one refresh per manager at a time.

Flow: event -> Target -> **batch (TargetCollection)** -> refresher (collector ->
parser -> persister) -> ack.

Catchers hand targets with an :class:`~daemon.model.acks.Ack` to :meth:`Batcher.submit`
(the :class:`~daemon.model.acks.TargetSink` protocol).  Per manager the batcher keeps
one pending batch (client-go's coalescing workqueue, DESIGN.md 6-9; the intake
is :mod:`daemon.pipeline.coalescing`, when a batch is due and whether it is targeted or
full is :mod:`daemon.pipeline.batches`, measured costs :mod:`daemon.pipeline.refresh_costs`) and:

* runs one refresh per manager at a time, at most ``workers`` at once overall,
  the manager due the longest first; a full refresh absorbs everything queued
  before it starts, targets arriving during it go into the next batch; given a
  ``collect`` function, a manager's next targeted batch collects while the
  previous one persists, commits in collect order (:mod:`daemon.pipeline.commit_order`);
* keeps a failed refresh's targets and acks, merges them with newer ones and
  retries with backoff; after ``escalate_after`` consecutive failures the retry
  is a full refresh;
* resolves an ack only when every target it waits on was committed by a refresh
  that started after the target arrived (at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType, TracebackType

from daemon.model.acks import Ack, QueueFullError
from daemon.model.targets import Target, TargetCollection, Trigger
from daemon.persistence.refresh_result import RefreshKind
from daemon.pipeline.batch_records import BatcherStats, ManagerStatus, RefreshAttempt, RefreshHooks
from daemon.pipeline.batches import BatchingSettings, ManagerState, PendingBatch
from daemon.pipeline.clock import LOOP_CLOCK, Clock
from daemon.pipeline.coalescing import ManagerQueues
from daemon.pipeline.commit_order import (
    CANCEL_GRACE,
    CollectFn,
    RunningRefresh,
    cancel_running,
    run_in_turn,
)
from daemon.pipeline.outcomes import RefreshOutcomes, guard

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
        collect: CollectFn | None = None,
        may_start: Callable[[str], bool] = lambda _manager: True,
    ) -> None:
        self._refresh = refresh
        self._collect = collect
        self._may_start = may_start
        """Ownership gate (daemon/pipeline/ownership.py): a due batch of a manager this process
        does not own waits, its targets pending, until :meth:`wake` after it is owned."""
        self._settings = settings
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._hooks = hooks
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
        self._queues = ManagerQueues(settings, overrides=overrides, stats=self.stats)
        self._outcomes = RefreshOutcomes(
            stats=self.stats, hooks=hooks, clock=clock, rng=self._rng, guard=guard
        )

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
            added = self._queues.queue(targets, ack, now=now, pending=pending, limit=limit)
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

    def request_full(self, manager: str, *, trigger: Trigger = Trigger.MANUAL) -> Ack:
        """Queue a full refresh of ``manager`` (scheduler, manual refresh); never QueueFull."""
        if self._stopped:
            raise BatcherStoppedError("the batcher is stopped")
        now = self._clock.now()
        ack = Ack(received_at=now)
        self._queues.queue(
            [Target.full(manager, trigger=trigger)], ack, now=now, pending=0, limit=None
        )
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
        for state in self._queues:
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
            if self._queues.only_late_retries_left(deadline):
                return False
            self._settled.clear()
            if not await self._clock.wait_event(self._settled, deadline):
                break
        return self._idle.is_set()

    def waiting_to_retry(self) -> dict[str, int]:
        """Pending targets per manager that is waiting out a retry delay now."""
        return self._queues.waiting_to_retry(self._clock.now())

    async def close(self, *, cancel: bool = False, grace: float = CANCEL_GRACE) -> None:
        """Stop, end the dispatcher and wait for in-flight refreshes.

        With ``cancel=True`` in-flight refreshes are cancelled; their acks stay
        unresolved (the events will be delivered again).  One that has not ended
        ``grace`` seconds (clock time) later is left behind with a warning, so
        that stopping stays bounded (:func:`cancel_running`).
        """
        self.stop()
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        running = {state.manager: list(state.running) for state in self._queues}
        if cancel:
            await cancel_running(running, self._clock, grace)
        elif tasks := [r.task for rs in running.values() for r in rs if r.task is not None]:
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
        return self._queues.pending_count(manager)

    @property
    def running(self) -> bool:
        """The dispatcher task is alive (started, not closed, not crashed)."""
        return self._task is not None and not self._task.done()

    def in_flight_managers(self) -> frozenset[str]:
        return self._queues.in_flight()

    def manager_status(self, manager: str) -> ManagerStatus:
        """A snapshot of one manager (an idle status for a manager never seen)."""
        state = self._queues.get(manager) or ManagerState(manager, self.settings_for(manager))
        return state.status()

    def statuses(self) -> list[ManagerStatus]:
        """Snapshots of every manager with overrides or with targets seen so far."""
        return [self.manager_status(name) for name in self._queues.names()]

    def record_cost(
        self, manager: str, kind: RefreshKind, *, targets: int, duration: float
    ) -> None:
        """Count a refresh measured elsewhere (an earlier run, from ``refresh_runs``) in the
        costs that time batches and decide escalation."""
        costs = self._queues.state(manager).costs
        if kind is RefreshKind.FULL:
            costs.observe_full(duration)
        else:
            costs.observe_targeted(targets, duration)

    def settings_for(self, manager: str) -> BatchingSettings:
        return self._queues.settings_for(manager)

    # -- queueing -----------------------------------------------------------

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
            for state in self._queues
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
        kind = state.choose_kind(state.pending)
        batch, running = state.take_pending(kind)
        run = RefreshAttempt(
            kind=kind,
            collection=batch.collection(kind),
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
        running.task = asyncio.create_task(
            self._run_refresh(state, batch, run, running), name=f"refresh {state.manager}"
        )
        self._room.set()
        guard(state.manager, lambda: self._hooks.on_start(state.manager, run.collection))

    async def _run_refresh(
        self, state: ManagerState, batch: PendingBatch, run: RefreshAttempt, running: RunningRefresh
    ) -> None:
        try:
            result, waited = await run_in_turn(
                running,
                run.collection,
                run.kind,
                refresh=self._refresh,
                collect=self._collect,
                clock=self._clock,
                collected=self._wake.set,  # the manager's next batch may collect now
            )
        except asyncio.CancelledError:
            state.restore(batch)
            raise
        except Exception as exc:  # noqa: BLE001 -- any error fails the run; logged by outcomes
            self._outcomes.failed(state, batch, run, exc)
        else:
            self._outcomes.succeeded(state, batch, run, result, waited=waited)
        finally:
            state.ended(running)
            self._running -= 1
            self._wake.set()
            self._settled.set()
            if self.pending_count() == 0 and not self.in_flight_managers():
                self._idle.set()


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.critical("batcher dispatcher crashed; no refresh will start", exc_info=exc)
