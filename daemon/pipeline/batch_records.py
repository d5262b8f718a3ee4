"""Batch records: what the batcher reports about its batches, refreshes and managers.

Flow: event -> Target -> **batch** -> refresher -> ack.  These are the values the
batcher hands out (hooks, counters, per-manager snapshots); the state it works
on is in :mod:`daemon.pipeline.batches`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.model.targets import TargetCollection
from daemon.persistence.refresh_result import RefreshKind


def _ignore_start(manager: str, collection: TargetCollection) -> None:
    pass


def _ignore_success(manager: str, collection: TargetCollection, result: object) -> None:
    pass


def _ignore_failure(manager: str, collection: TargetCollection, exc: Exception) -> None:
    pass


@dataclass(frozen=True, slots=True)
class RefreshHooks:
    """Callbacks for metrics and ``refresh_runs``; called synchronously, must not block.

    Each receives the manager and the collection handed to the refresh (for a
    full refresh: the manager target only).  When ``on_failure`` runs, the
    manager's status already shows the retry (``next_retry_at``,
    ``consecutive_failures``).  Exceptions raised by a hook are logged and
    otherwise ignored.
    """

    on_start: Callable[[str, TargetCollection], None] = _ignore_start
    on_success: Callable[[str, TargetCollection, object], None] = _ignore_success
    on_failure: Callable[[str, TargetCollection, Exception], None] = _ignore_failure


@dataclass(frozen=True, slots=True)
class RefreshAttempt:
    """One dispatched refresh of a manager."""

    kind: RefreshKind
    collection: TargetCollection
    """What the refresh is given (for a full refresh: the manager target only)."""
    targets: int
    """Distinct targets the batch covers (those absorbed by a full refresh included)."""
    attempt: int
    """1, or n after n-1 consecutive failures of the manager."""
    started_at: float


def _per_kind() -> dict[RefreshKind, int]:
    return dict.fromkeys(RefreshKind, 0)


@dataclass(slots=True)
class BatcherStats:
    """Monotonic counters since start (export them as Prometheus counters)."""

    targets_enqueued: int = 0
    """Targets accepted by submit / request_full."""
    targets_coalesced: int = 0
    """Accepted targets that were already pending for their manager."""
    targets_rejected: int = 0
    """Targets refused with QueueFullError."""
    escalations: int = 0
    """Retries turned into a full refresh after ``escalate_after`` failures."""
    batches_dispatched: dict[RefreshKind, int] = field(default_factory=_per_kind)
    refresh_successes: dict[RefreshKind, int] = field(default_factory=_per_kind)
    refresh_failures: dict[RefreshKind, int] = field(default_factory=_per_kind)


@dataclass(frozen=True, slots=True)
class ManagerStatus:
    """A snapshot of one manager in the batcher (times are clock times)."""

    manager: str
    pending: int
    """Distinct targets waiting for the next batch."""
    in_flight: bool
    """A refresh of this manager is running now."""
    in_flight_kind: RefreshKind | None
    """Kind of the oldest refresh in flight."""
    in_flight_targets: int
    """Distinct targets of the refreshes in flight (two overlap at most)."""
    consecutive_failures: int
    next_retry_at: float | None
    pending_since: float | None
    last_success_at: float | None
    last_failure_at: float | None
    last_error: str | None
