"""Batches: the batcher's settings, per-manager state and the records it reports.

Flow: event -> Target -> **batch** -> refresher -> ack.  The scheduling loop is
in :mod:`daemon.pipeline.batcher`; this module holds what it works on.

A :class:`PendingBatch` is one manager's deduplicated targets together with
the acks waiting on each of them.  Every (ack, target) pair handed to the
batcher sits in exactly one list, so committing a batch resolves each pair
exactly once, and a failed batch is merged back whole (targets *and* acks)
into the manager's next one.  A :class:`ManagerState` adds the timing rules
that say when the pending batch is due (the earliest of):

* once its oldest target has waited ``debounce``, quiet or not: a steady
  stream does not hold a batch back (so it never waits longer than after
  ``debounce`` of quiet either); while a refresh of the manager runs (the batch
  would overlap it), once it has waited as long as its refresh is estimated to
  take (:mod:`daemon.pipeline.refresh_costs`), if that is longer: a refresh of few
  targets is not worth starting next to one that will soon end;
* ``max_delay`` after its oldest target, whatever the estimate;
* at once at ``max_targets`` (a targeted refresh takes at most that many, the
  oldest first; the rest stay pending and due), or when flushed;

never before the manager's retry time, and how it is refreshed
(:meth:`ManagerState.choose_kind`): full when it holds the manager target;
past ``full_refresh_threshold`` full only when the last full refresh of the
manager was cheaper than the estimated targeted refresh (when no full refresh
was measured yet, the threshold alone decides; when only the targeted cost is
missing, a targeted refresh goes first and measures it), and never after a full
refresh until the manager caught up with what arrived since, nor after a failed
escalation until a full refresh succeeds (:class:`Escalation`), so a backlog
cannot turn into a loop of full refreshes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from daemon.model.acks import Ack
from daemon.model.targets import Ref, Target, TargetCollection, Trigger
from daemon.persistence.refresh_result import RefreshKind
from daemon.pipeline.backoff import Backoff
from daemon.pipeline.batch_records import ManagerStatus
from daemon.pipeline.commit_order import RunningRefresh, may_start_another
from daemon.pipeline.refresh_costs import ManagerCosts


@dataclass(frozen=True, slots=True)
class BatchingSettings:
    """How targets are batched and retried (per manager; ``workers`` and
    ``max_pending_targets`` are global and read from the default settings)."""

    debounce: float = 0.05
    """Seconds a batch waits from its oldest target for more targets to coalesce (quiet
    or not); while the manager's previous refresh runs, as long as the batch's refresh is
    estimated to take when that is longer (up to ``max_delay``)."""
    max_delay: float = 1.0
    """Seconds; no target waits longer than this from its first arrival, even under a
    steady stream."""
    max_targets: int = 500
    """Distinct targets; a batch this big is dispatched at once, and a targeted refresh
    takes at most this many (the oldest; the rest go next)."""
    full_refresh_threshold: int = 1000
    """Distinct targets; a batch at or above it becomes a full refresh when the manager's
    last full refresh took less time than refreshing the batch's targets is estimated to
    (or before a full refresh was measured); a batch below it is never escalated by its
    size."""
    workers: int = 4
    """Refreshes running at once across all managers (global)."""
    retry_initial: float = 1.0
    """Seconds before the first retry of a failed refresh."""
    retry_max: float = 300.0
    """Seconds; cap of the retry delay."""
    retry_multiplier: float = 2.0
    """Growth factor of the retry delay between consecutive failures."""
    retry_jitter: float = 0.1
    """Fraction of the retry delay added or removed at random."""
    escalate_after: int = 3
    """Consecutive failures of a targeted refresh after which the retry is a full refresh."""
    max_pending_targets: int = 100_000
    """Distinct pending targets across all managers before submit raises QueueFullError
    (global)."""
    targeted_refresh: bool = True
    """False: every batch is a full refresh (a manager with ``allow_targeted_refresh =
    false``); not a ``[batching]`` key."""

    def __post_init__(self) -> None:
        if self.debounce < 0 or self.max_delay < 0:
            raise ValueError("debounce and max_delay must be >= 0")
        for name in (
            "max_targets",
            "full_refresh_threshold",
            "workers",
            "escalate_after",
            "max_pending_targets",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        self.backoff  # noqa: B018 -- validates the retry fields

    @property
    def backoff(self) -> Backoff:
        return Backoff(
            initial=self.retry_initial,
            maximum=self.retry_max,
            multiplier=self.retry_multiplier,
            jitter=self.retry_jitter,
        )


GLOBAL_BATCHING_KEYS: dict[str, str] = {
    "workers": "refreshes running at once across all managers",
    "max_pending_targets": "pending targets across all managers before submit refuses",
}
"""The :class:`BatchingSettings` fields the batcher reads from its default settings only
(what each means); a manager's own settings cannot change them."""


class PendingBatch:
    """Deduplicated targets of one manager and the acks waiting on each."""

    __slots__ = ("_acks", "first_at", "last_at", "targets")

    def __init__(self, manager: str) -> None:
        self.targets = TargetCollection(manager)
        self._acks: dict[tuple[str, Ref], list[Ack]] = {}
        self.first_at = 0.0
        """Clock time the oldest target arrived (meaningless while empty)."""
        self.last_at = 0.0
        """Clock time the newest target arrived."""

    def __len__(self) -> int:
        return len(self.targets)

    def __bool__(self) -> bool:
        return bool(self.targets)

    def add(self, target: Target, acks: Iterable[Ack], *, now: float) -> bool:
        """Add ``target`` with its waiting acks; False when it was already pending."""
        self._stamp(now, now)
        return self._add(target, acks)

    def add_one(self, target: Target, ack: Ack, *, now: float) -> bool:
        """:meth:`add` with one ack, the per-event path: one lookup, no temporary list."""
        self._stamp(now, now)
        key = (target.association, target.manager_ref)
        waiting = self._acks.get(key)
        if waiting is not None:
            waiting.append(ack)
            return False
        self.targets.add_target(target)
        self._acks[key] = [ack]
        return True

    def holds(self, target: Target) -> bool:
        """Whether a target equal to ``target`` is pending."""
        return (target.association, target.manager_ref) in self._acks

    def absorb(self, other: PendingBatch) -> None:
        """Move every target and ack of ``other`` into this batch."""
        if other:
            self._stamp(other.first_at, other.last_at)
        for target in other.targets:
            self._add(target, other._acks[target.key])

    def take_oldest(self, limit: int) -> PendingBatch:
        """Move the ``limit`` oldest targets with their acks into a new batch (in
        ``limit`` steps, whatever the size of this one).  Both keep this batch's
        arrival times, so what stays is as due as this batch was."""
        head = PendingBatch(self.targets.manager)
        acks = self._acks
        for target in self.targets.take_first(limit):
            head._add(target, acks.pop(target.key))
        head.first_at, head.last_at = self.first_at, self.last_at
        return head

    def collection(self, kind: RefreshKind) -> TargetCollection:
        """What to refresh: the targets, or only the manager target for a full refresh."""
        if kind is RefreshKind.TARGETED:
            return self.targets
        manager = self.targets.manager
        full = next((t for t in self.targets if t.is_full), None) or Target.full(
            manager, trigger=Trigger.ESCALATED
        )
        return TargetCollection(manager, [full])

    def commit(self) -> None:
        """The batch was saved: every waiting ack counts its target committed."""
        for acks in self._acks.values():
            for ack in acks:
                ack.target_committed()

    def _add(self, target: Target, acks: Iterable[Ack]) -> bool:
        added = self.targets.add_target(target)
        self._acks.setdefault(target.key, []).extend(acks)
        return added

    def _stamp(self, first: float, last: float) -> None:
        if self._acks:  # a key per pending target: non-empty exactly when targets is
            if first < self.first_at:
                self.first_at = first
            if last > self.last_at:
                self.last_at = last
        else:
            self.first_at, self.last_at = first, last


class Escalation(enum.Enum):
    """Whether a manager's next batch may be made a full refresh for its size."""

    ALLOWED = "allowed"
    AFTER_FULL = "after full"
    """No: a full refresh covered everything pending before it started; what arrived
    since is refreshed targeted until the manager has caught up (a batch below the
    threshold is dispatched), then ALLOWED again."""
    REFUSED = "refused"
    """No: a full refresh chosen for size failed (the mass-deletion guard refused it,
    say); until a full refresh succeeds (the scheduled one) batches stay targeted."""


class ManagerState:
    """One manager in the batcher: its pending batch, the running one, its failures."""

    __slots__ = (
        "costs",
        "escalation",
        "failures",
        "flush_requested",
        "last_error",
        "last_failure_at",
        "last_success_at",
        "manager",
        "next_retry_at",
        "pending",
        "running",
        "settings",
    )

    def __init__(self, manager: str, settings: BatchingSettings) -> None:
        self.manager = manager
        self.settings = settings
        self.pending = PendingBatch(manager)
        self.running: list[RunningRefresh] = []
        """Its refreshes in flight, oldest first (two when the next collects while the
        previous persists, see :mod:`daemon.pipeline.commit_order`)."""
        self.costs = ManagerCosts()
        self.escalation = Escalation.ALLOWED
        self.failures = 0
        self.next_retry_at: float | None = None
        self.flush_requested = False
        self.last_success_at: float | None = None
        self.last_failure_at: float | None = None
        self.last_error: str | None = None

    def due_at(self) -> float | None:
        """When the pending batch may be dispatched; None while empty, or while refreshes
        of the manager run that it may not overlap."""
        if not self.pending:
            return None
        if self.running and not may_start_another(self.running, self.choose_kind(self.pending)):
            return None
        batch, settings = self.pending, self.settings
        age = settings.debounce
        if self.running:  # it would overlap the running refresh: worth it once it is as
            estimate = self.costs.batch_seconds(len(batch))  # old as its refresh takes
            age = max(age, estimate or 0.0)
        when = batch.first_at + min(age, settings.max_delay)
        if self.flush_requested:
            when = min(when, batch.first_at)
        elif len(batch) >= settings.max_targets:
            when = min(when, batch.last_at)
        if self.next_retry_at is not None:
            when = max(when, self.next_retry_at)
        return when

    def choose_kind(self, batch: PendingBatch) -> RefreshKind:
        """Targeted or full, for ``batch`` about to be dispatched (see the module doc)."""
        if batch.targets.is_full or not self.settings.targeted_refresh:
            return RefreshKind.FULL
        if (
            len(batch) < self.settings.full_refresh_threshold
            or self.escalation is not Escalation.ALLOWED
        ):
            return RefreshKind.TARGETED
        cheaper = self.costs.full_is_cheaper(len(batch))
        if cheaper is None:  # not measured: the threshold decides, unless only the
            # targeted cost is missing: then a targeted refresh measures it first
            cheaper = self.costs.last_full is None
        return RefreshKind.FULL if cheaper else RefreshKind.TARGETED

    def growth(self, targets: Iterable[Target]) -> int:
        """How many distinct pending targets submitting ``targets`` would add."""
        pending = self.pending
        return len({t.key for t in targets if not pending.holds(t)})

    def take_pending(self, kind: RefreshKind) -> tuple[PendingBatch, RunningRefresh]:
        """Move the pending batch in flight (a targeted one: its ``max_targets`` oldest
        targets, the rest stay pending and due); new targets start a fresh batch."""
        limit = self.settings.max_targets
        if (
            self.escalation is Escalation.AFTER_FULL
            and len(self.pending) < self.settings.full_refresh_threshold
        ):
            self.escalation = Escalation.ALLOWED  # caught up since the full refresh
        if kind is RefreshKind.TARGETED and len(self.pending) > limit:
            batch = self.pending.take_oldest(limit)
        else:
            batch, self.pending = self.pending, PendingBatch(self.manager)
        previous = self.running[-1] if self.running else None
        running = RunningRefresh(kind, batch_size=len(batch), previous=previous)
        self.running.append(running)
        self.flush_requested = self.flush_requested and bool(self.pending)
        return batch, running

    def ended(self, running: RunningRefresh) -> None:
        """``running`` is over (committed, failed or cancelled)."""
        running.end()
        self.running.remove(running)

    def restore(self, batch: PendingBatch) -> None:
        """Put an unfinished batch back in front of the targets that arrived since."""
        merged = PendingBatch(self.manager)
        merged.absorb(batch)
        merged.absorb(self.pending)
        self.pending = merged

    def succeeded(self, kind: RefreshKind, *, targets: int, duration: float, now: float) -> None:
        if kind is RefreshKind.FULL:
            self.costs.observe_full(duration)
        else:
            self.costs.observe_targeted(targets, duration)
        # targets that arrived during a full refresh stay targeted: no full-refresh loop
        if kind is RefreshKind.FULL:
            self.escalation = Escalation.AFTER_FULL
        self.failures = 0
        self.next_retry_at = None
        self.last_success_at = now

    def failed(
        self,
        batch: PendingBatch,
        exc: Exception,
        *,
        kind: RefreshKind,
        now: float,
        retry_at: float,
        escalate: bool,
    ) -> None:
        self.failures += 1
        if kind is RefreshKind.FULL and not batch.targets.is_full:
            # a full refresh chosen for the batch's size failed (the mass-deletion guard
            # refused it, say): retry the targets as targeted refreshes, and choose no
            # full refresh for size until one (the scheduled one) succeeds
            self.escalation = Escalation.REFUSED
        self.restore(batch)
        if escalate:
            self.pending.add(Target.full(self.manager, trigger=Trigger.ESCALATED), (), now=now)
        self.next_retry_at = retry_at
        self.last_failure_at = now
        self.last_error = f"{type(exc).__name__}: {exc}"

    def status(self) -> ManagerStatus:
        running = self.running
        return ManagerStatus(
            manager=self.manager,
            pending=len(self.pending),
            in_flight=bool(running),
            in_flight_kind=running[0].kind if running else None,
            in_flight_targets=sum(r.batch_size for r in running),
            consecutive_failures=self.failures,
            next_retry_at=self.next_retry_at,
            pending_since=self.pending.first_at if self.pending else None,
            last_success_at=self.last_success_at,
            last_failure_at=self.last_failure_at,
            last_error=self.last_error,
        )
