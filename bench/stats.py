"""Statistics the benchmarks print: percentiles of samples, quantiles of a Prometheus
histogram between two scrapes, milliseconds.

Flow: samples or scraped buckets -> **stats** -> printed figures.
"""

from __future__ import annotations

import math
import statistics


def percentile(values: list[float], p: int) -> float:
    """The p-th percentile (1..99), linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """q-quantile of the observations between two scrapes of one histogram (``le`` ->
    cumulative count), linear within a bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            share = (rank - below) / max(cumulative - below, 1e-9)
            return lower + (bound - lower) * share
        lower, below = bound, cumulative
    return lower


def ms(s: float) -> str:
    """Seconds as milliseconds, 8 wide."""
    return f"{1000 * s:8.2f}"
