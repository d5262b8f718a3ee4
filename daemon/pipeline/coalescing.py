"""Coalescing: every manager's pending targets, filled by the batcher's intake.

Flow: event -> Target -> **pending batch per manager** -> dispatch (daemon.pipeline.batcher)
-> refresher -> ack.

:class:`ManagerQueues` owns the :class:`~daemon.pipeline.batches.ManagerState` of each
manager seen so far and queues one event at a time into them, following
client-go's coalescing workqueue (DESIGN.md 9):

* a target already pending is not added twice: the new ack also waits on it;
* a target arriving while its manager refreshes goes into the pending batch,
  i.e. the next one, never into the batch already running;
* an event is queued whole or not at all: when its new targets would take the
  pending count past ``max_pending_targets`` it is refused and its ack is left
  untouched (the catcher answers "queue full" and keeps the event).

Timing (when a pending batch is due) is the batch's own business
(:mod:`daemon.pipeline.batches`); dispatching is the batcher's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from daemon.model.acks import Ack
from daemon.model.targets import Target
from daemon.pipeline.batch_records import BatcherStats
from daemon.pipeline.batches import BatchingSettings, ManagerState


class ManagerQueues:
    """The per-manager states of one batcher and the intake into them."""

    __slots__ = ("_overrides", "_settings", "_states", "_stats")

    def __init__(
        self,
        settings: BatchingSettings,
        *,
        overrides: Mapping[str, BatchingSettings],
        stats: BatcherStats,
    ) -> None:
        self._settings = settings
        self._overrides = dict(overrides)
        self._states: dict[str, ManagerState] = {}
        self._stats = stats

    def settings_for(self, manager: str) -> BatchingSettings:
        return self._overrides.get(manager, self._settings)

    def state(self, manager: str) -> ManagerState:
        """The state of ``manager``, created on first use."""
        state = self._states.get(manager)
        if state is None:
            state = self._states[manager] = ManagerState(manager, self.settings_for(manager))
        return state

    def get(self, manager: str) -> ManagerState | None:
        return self._states.get(manager)

    def __iter__(self) -> Iterator[ManagerState]:
        return iter(self._states.values())

    def names(self) -> list[str]:
        """Managers with targets seen so far or with overrides, sorted."""
        return sorted(set(self._states) | set(self._overrides))

    def in_flight(self) -> frozenset[str]:
        """Managers with a refresh running."""
        return frozenset(state.manager for state in self._states.values() if state.running)

    def waiting_to_retry(self, now: float) -> dict[str, int]:
        """Pending targets per manager that is waiting out a retry delay at ``now``."""
        return {
            state.manager: len(state.pending)
            for state in self._states.values()
            if state.pending and state.next_retry_at is not None and state.next_retry_at > now
        }

    def only_late_retries_left(self, deadline: float) -> bool:
        """Nothing runs, and every pending batch waits out a retry delay past ``deadline``."""
        return not self.in_flight() and all(
            state.next_retry_at is not None and state.next_retry_at > deadline
            for state in self._states.values()
            if state.pending
        )

    def pending_count(self, manager: str | None = None) -> int:
        """Distinct pending targets of ``manager``, or of all managers."""
        if manager is not None:
            state = self._states.get(manager)
            return len(state.pending) if state else 0
        return sum(len(state.pending) for state in self._states.values())

    def queue(
        self, targets: Sequence[Target], ack: Ack, *, now: float, pending: int, limit: int | None
    ) -> int:
        """Queue one event (any number of targets and managers), unless it would take the
        ``pending`` targets past ``limit``; returns how many pending targets it added, or
        -1 when it was refused.  The caller counts ``targets_enqueued`` and wakes up."""
        stats = self._stats
        if len(targets) == 1:  # the common case: no grouping, one lookup
            target = targets[0]
            waiting = self.state(target.manager).pending
            if limit is not None and pending >= limit and not waiting.holds(target):
                stats.targets_rejected += 1
                return -1
            ack.expect(1)
            if waiting.add_one(target, ack, now=now):
                return 1
            stats.targets_coalesced += 1
            return 0
        if not targets:
            ack.resolve_if_empty()
            return 0
        by_manager: dict[str, list[Target]] = {}
        for target in targets:
            by_manager.setdefault(target.manager, []).append(target)
        if limit is not None:
            growth = sum(self.state(m).growth(batch) for m, batch in by_manager.items())
            if growth > 0 and pending + growth > limit:
                stats.targets_rejected += len(targets)
                return -1
        ack.expect(len(targets))
        added = 0
        for manager, batch in by_manager.items():
            pending_batch = self.state(manager).pending
            for target in batch:
                if pending_batch.add_one(target, ack, now=now):
                    added += 1
                else:
                    stats.targets_coalesced += 1
        return added
