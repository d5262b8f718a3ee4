"""Retry delays: how long a failed refresh waits before it is tried again.

Flow: batch -> refresher **fails** -> backoff -> the same targets (merged with
newer ones) are refreshed again.

A :class:`Backoff` is an exponential sequence with a cap and a symmetric
jitter.  The error itself may know better: an exception carrying a
``retry_after`` attribute (seconds, e.g. from an HTTP ``Retry-After``
header) sets the minimum delay, never beyond ``maximum`` (a server asking
for hours cannot stall a manager longer than the cap), and one whose ``retryable`` attribute is
False (refused credentials) waits the full cap -- its targets are still
kept, because an event is never forgotten before it is saved.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff: ``initial * multiplier**(failures-1)``, capped, with jitter."""

    initial: float = 1.0
    """Seconds before the first retry."""
    maximum: float = 300.0
    """Seconds; no computed delay exceeds this (before jitter)."""
    multiplier: float = 2.0
    """Growth factor between consecutive retries."""
    jitter: float = 0.1
    """Fraction: the delay is scaled by a uniform factor in ``[1 - jitter, 1 + jitter]``."""

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < self.initial:
            raise ValueError("backoff needs 0 <= initial <= maximum")
        if self.multiplier < 1:
            raise ValueError("backoff multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be in [0, 1]")

    def delay(self, failures: int, *, rng: random.Random) -> float:
        """The delay after ``failures`` consecutive failures (``failures >= 1``)."""
        exponent = max(failures - 1, 0)
        # Compare in log space so a long failure streak cannot overflow.
        if self.initial == 0:
            base = 0.0
        elif exponent * math.log(self.multiplier) >= math.log(self.maximum / self.initial):
            base = self.maximum
        else:
            base = self.initial * self.multiplier**exponent
        if self.jitter:
            base *= 1 + rng.uniform(-self.jitter, self.jitter)
        return base

    def delay_after(self, exc: BaseException, failures: int, *, rng: random.Random) -> float:
        """The delay before retrying after ``exc``, honouring its own retry hints."""
        delay = self.delay(failures, rng=rng)
        if getattr(exc, "retryable", True) is False:
            delay = max(delay, self.maximum)
        hint = retry_after(exc)
        if hint is not None:
            delay = max(delay, min(hint, self.maximum))
        return delay


def retry_after(exc: BaseException) -> float | None:
    """The ``retry_after`` hint (seconds) an exception carries, if it is a usable number."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return float(value)
