"""Refresh outcomes: what the batcher does when a dispatched refresh ends.

Flow: batch -> refresher -> **outcome** -> ack (success) or retry (failure).

* Success: the manager's failure count resets, the refresh's duration is
  recorded (:mod:`daemon.pipeline.refresh_costs`), every ack waiting on the batch counts
  its targets committed, and the ``on_success`` hook runs.
* Failure: the batch's targets and acks go back in front of the targets that
  arrived since, the retry time follows the backoff settings (``Retry-After``
  honoured), and after ``escalate_after`` consecutive failures of a targeted
  refresh the retry is a full refresh; the ``on_failure`` hook runs.  The first
  failure and an escalation are logged as warnings, further retries at debug.

Hooks are run through the batcher's guard: a broken hook is logged, never raised.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from daemon.persistence.refresh_result import RefreshKind
from daemon.pipeline.batch_records import BatcherStats, RefreshAttempt, RefreshHooks
from daemon.pipeline.batches import ManagerState, PendingBatch
from daemon.pipeline.clock import Clock

logger = logging.getLogger("daemon.pipeline.batcher")

Guard = Callable[[str, Callable[[], None]], None]


def guard(manager: str, call_hook: Callable[[], None]) -> None:
    """Run a hook; a broken hook is logged and never stops the batcher."""
    try:
        call_hook()
    except Exception:
        logger.exception("%s: refresh hook failed", manager)


class RefreshOutcomes:
    """Applies the end of a refresh to its manager's state, the stats and the hooks."""

    __slots__ = ("_clock", "_guard", "_hooks", "_rng", "stats")

    def __init__(
        self,
        *,
        stats: BatcherStats,
        hooks: RefreshHooks,
        clock: Clock,
        rng: random.Random,
        guard: Guard,
    ) -> None:
        self.stats = stats
        self._hooks = hooks
        self._clock = clock
        self._rng = rng
        self._guard = guard

    def succeeded(
        self,
        state: ManagerState,
        batch: PendingBatch,
        run: RefreshAttempt,
        result: object,
        *,
        waited: float = 0.0,
    ) -> None:
        """``waited``: seconds the refresh waited for the previous one to commit."""
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
        busy = now - run.started_at - waited
        state.succeeded(run.kind, targets=run.targets, duration=busy, now=now)
        batch.commit()
        self._guard(
            state.manager, lambda: self._hooks.on_success(state.manager, run.collection, result)
        )

    def failed(
        self, state: ManagerState, batch: PendingBatch, run: RefreshAttempt, exc: Exception
    ) -> None:
        now = self._clock.now()
        self.stats.refresh_failures[run.kind] += 1
        settings = state.settings
        failures = state.failures + 1
        retry_at = now + settings.backoff.delay_after(exc, failures, rng=self._rng)
        escalate = run.kind is RefreshKind.TARGETED and failures >= settings.escalate_after
        state.failed(batch, exc, kind=run.kind, now=now, retry_at=retry_at, escalate=escalate)
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
