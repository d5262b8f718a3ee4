"""A daemon's Prometheus metrics as the benchmarks read them: samples by name and labels,
sums over labels, the event-to-commit latency histogram.

Flow: `refreshd run` -> ``GET /metrics`` -> **metrics** -> stats -> printed figures.
"""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
LATENCY = "refreshd_event_commit_latency_seconds_bucket"
"""The buckets of the daemon's event-to-commit latency histogram (label ``le`` only)."""


def parse(text: str) -> Samples:
    """(sample name, sorted labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(url: str) -> Samples:
    """The metrics of the daemon listening at ``url``."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        return parse(await resp.text())


def total(m: Samples, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``."""
    return sum(
        v
        for (n, lab), v in m.items()
        if n == name and all(dict(lab).get(k) == x for k, x in labels.items())
    )


def diff(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def latency_buckets(m: Samples) -> dict[float, float]:
    """The event-to-commit histogram: ``le`` -> cumulative count (summed over series)."""
    buckets: dict[float, float] = {}
    for (name, labels), value in m.items():
        if name == LATENCY:
            le = float(dict(labels)["le"])
            buckets[le] = buckets.get(le, 0.0) + value
    return buckets


async def full_refresh_done(url: str) -> bool:
    """The daemon at ``url`` has made its start-up full refresh."""
    try:
        m = await scrape(url)
    except aiohttp.ClientError:
        return False
    return total(m, "refreshd_refreshes_total", kind="full", outcome="success") >= 1
