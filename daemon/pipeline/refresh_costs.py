"""Refresh costs: what refreshing a manager has cost lately, measured on the batcher's clock.

Flow: event -> Target -> **batch** (when it goes, targeted or full) -> refresher.

The batcher records the duration of every successful refresh of a manager
here and asks two questions of it:

* *how long will a targeted refresh of n targets take?*  Targeted refreshes
  cost a fixed part (round trips, commit) plus a part per target.  Both are
  estimated by a least-squares line through recent refreshes, weighted
  towards the newest (exponentially weighted moments, so memory stays
  constant and old measurements fade).  While every recent batch had about
  the same size the slope cannot be told apart from the intercept: then
  the due time uses the recent mean duration, and the escalation decision
  takes the cost as proportional to n (mean duration / mean size, an upper
  bound, as it charges the fixed part to every target).
* *how long did the last full refresh take?*  Its measured duration.

A batch is worth going once it has waited as long as refreshing it will take
(:meth:`ManagerCosts.batch_seconds`), and a batch past ``full_refresh_threshold``
becomes a full refresh only when its targeted estimate exceeds the last full
refresh's duration (see :mod:`daemon.pipeline.batcher`).  Nothing here reads the time
or does I/O; the numbers come from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT = 0.2
"""Weight of the newest measurement in the moving moments (about the last 10 refreshes count)."""


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """A targeted refresh's estimated duration: ``fixed + per_target * n`` seconds."""

    fixed: float
    per_target: float

    def of(self, targets: int) -> float:
        return self.fixed + self.per_target * targets


class ManagerCosts:
    """Measured refresh durations of one manager (seconds on the batcher's clock)."""

    __slots__ = ("_d", "_n", "_nd", "_nn", "_samples", "last_full")

    def __init__(self) -> None:
        self._samples = 0
        self._n = self._d = self._nn = self._nd = 0.0
        self.last_full: float | None = None
        """Duration of the last successful full refresh, None before one was measured."""

    def observe_targeted(self, targets: int, duration: float) -> None:
        """A targeted refresh of ``targets`` distinct targets succeeded in ``duration`` s."""
        if targets < 1 or duration < 0:
            return
        n, d = float(targets), duration
        if self._samples == 0:
            self._n, self._d, self._nn, self._nd = n, d, n * n, n * d
        else:
            w, keep = WEIGHT, 1.0 - WEIGHT
            self._n = keep * self._n + w * n
            self._d = keep * self._d + w * d
            self._nn = keep * self._nn + w * n * n
            self._nd = keep * self._nd + w * n * d
        self._samples += 1

    def observe_full(self, duration: float) -> None:
        """A full refresh succeeded in ``duration`` seconds."""
        if duration >= 0:
            self.last_full = duration

    def line(self) -> CostEstimate | None:
        """The line ``fixed + per_target * n`` through recent targeted refreshes, when
        their sizes varied enough to tell its slope from its intercept."""
        if self._samples < 2:
            return None
        mean_n, mean_d = self._n, self._d
        variance = self._nn - mean_n * mean_n
        if variance <= (0.1 * mean_n) ** 2:
            return None
        slope = (self._nd - mean_n * mean_d) / variance
        if slope < 0:  # noise: bigger batches were not slower
            return CostEstimate(fixed=mean_d, per_target=0.0)
        fixed = mean_d - slope * mean_n
        if fixed < 0:
            return CostEstimate(fixed=0.0, per_target=mean_d / mean_n)
        return CostEstimate(fixed=fixed, per_target=slope)

    def batch_seconds(self, targets: int) -> float | None:
        """Expected duration of a targeted refresh of ``targets``: on the line, or the
        recent mean duration while the line is unknown; None before any was measured."""
        if self._samples == 0:
            return None
        line = self.line()
        return line.of(targets) if line is not None else self._d

    def targeted_upper(self, targets: int) -> float | None:
        """Like :meth:`batch_seconds`, but proportional to ``targets`` (mean duration per
        target, an upper bound) while the line is unknown."""
        if self._samples == 0:
            return None
        line = self.line()
        return line.of(targets) if line is not None else self._d / self._n * targets

    def full_is_cheaper(self, targets: int) -> bool | None:
        """Whether the last full refresh took less than ``targets`` targets are estimated
        to (:meth:`targeted_upper`); None while either cost is unknown."""
        estimate = self.targeted_upper(targets)
        if estimate is None or self.last_full is None:
            return None
        return estimate > self.last_full
