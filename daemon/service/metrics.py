"""Prometheus metrics: what the pipeline did, per catcher, manager, kind and collection.

Flow: catchers -> batcher -> refresher -> persister, all observed here; scraped at ``/metrics``.

Counters that live in the pipeline's own stats (catchers' received/decoded/
skipped/dead-lettered, the batcher's enqueued/coalesced, pending targets, consumer
lag) are read at scrape time by the collectors of
:mod:`daemon.service.scrape_collectors`, so the pipeline never imports prometheus.
Refresh outcomes, durations, rows written and event-to-commit latency are
recorded as they happen.  Each daemon has its own registry (tests run several),
with the process, platform and gc collectors in it.

Freshness: ``refreshd_manager_last_success_timestamp_seconds{manager,kind}`` is
the wall time of each manager's last successful refresh per kind (seeded from
``refresh_runs`` at start, so a restart does not reset it), next to
``refreshd_manager_refresh_interval_seconds{manager}`` so an alert can compare
the two.  No ``_created`` series are exported (``disable_created_metrics``).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from daemon.model.acks import Ack, TargetSink
from daemon.model.targets import Target
from daemon.persistence.refresh_result import RefreshResult
from daemon.service.scrape_collectors import (
    CatcherProbe,
    OwnershipCollector,
    OwnershipView,
    PipelineCollector,
    ProviderCollector,
    ProviderStats,
)

LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1,
    1.5,
    2,
    3,
    5,
    10,
    30,
    60,
    300,
)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


disable_created_metrics()  # type: ignore[no-untyped-call]
"""Process-wide in prometheus_client: no ``_created`` series beside counters and histograms."""


class Metrics:
    def __init__(self, *, version: str = "unknown") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # the default registry's collectors, registered again in ours
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        build_info = Gauge(
            "refreshd_build_info",
            "The running refreshd's version (always 1)",
            ["version"],
            registry=r,
        )
        build_info.labels(version).set(1)
        self.last_success = Gauge(
            "refreshd_manager_last_success_timestamp_seconds",
            "Wall time (Unix seconds) of the manager's last successful refresh of this kind",
            ["manager", "kind"],
            registry=r,
        )
        self.refresh_interval = Gauge(
            "refreshd_manager_refresh_interval_seconds",
            "The manager's configured refresh_interval (periodic full refresh)",
            ["manager"],
            registry=r,
        )
        self.refreshes = Counter(
            "refreshd_refreshes", "Refreshes finished", ["manager", "kind", "outcome"], registry=r
        )
        self.batches = Counter(
            "refreshd_batches", "Batches dispatched to the refresher", ["kind"], registry=r
        )
        self.refresh_duration = Histogram(
            "refreshd_refresh_duration_seconds",
            "Refresh duration",
            ["manager", "kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.rows_written = Counter(
            "refreshd_rows_written",
            "Rows written by refreshes",
            ["manager", "collection", "action"],
            registry=r,
        )
        self.objects_rejected = Counter(
            "refreshd_objects_rejected",
            "Objects a refresh could not save (their rows kept as they were; retried on their "
            "next event or full refresh; listed in the rejected_objects table)",
            ["manager", "collection", "reason"],
            registry=r,
        )
        self.deletions_held = Gauge(
            "refreshd_deletions_held",
            "Rows the manager's last full refresh would have archived/deleted but the "
            "mass-deletion guard held back (0: none held)",
            ["manager"],
            registry=r,
        )
        self.event_latency = EventLatencies(LATENCY_BUCKETS)
        """The event-to-commit histogram and the committed events counter."""
        r.register(self.event_latency)
        self._latencies: list[float] = []

    def refresh_started(self, kind: str) -> None:
        self.batches.labels(kind).inc()

    def refresh_succeeded(self, result: RefreshResult) -> None:
        kind = result.kind.value
        self.refreshes.labels(result.manager, kind, "success").inc()
        self.refresh_duration.labels(result.manager, kind).observe(result.duration)
        self.last_success.labels(result.manager, kind).set(time.time())
        for collection, c in result.counts.items():
            for action, n in (
                ("created", c.created),
                ("updated", c.updated),
                ("archived", c.archived),
                ("deleted", c.deleted),
            ):
                if n:
                    self.rows_written.labels(result.manager, collection, action).inc(n)
        for r in result.rejected:
            self.objects_rejected.labels(result.manager, r.collection, r.reason.value).inc()
        if result.kind.full:
            held = result.held_deletion
            self.deletions_held.labels(result.manager).set(held.would_remove if held else 0)

    def refresh_failed(self, manager: str, kind: str) -> None:
        self.refreshes.labels(manager, kind, "failure").inc()

    def manager_configured(
        self, manager: str, *, interval: float, last_success: Mapping[str, float]
    ) -> None:
        """A configured manager: its interval and, per kind, its last success (Unix seconds)
        from ``refresh_runs``; a manager never fully refreshed shows ``kind="full"`` as 0."""
        self.refresh_interval.labels(manager).set(interval)
        for kind, when in ({"full": 0.0} | dict(last_success)).items():
            self.last_success.labels(manager, kind).set(when)

    def observe_ack(self, ack: Ack, *, loop_clock: Callable[[], float]) -> None:
        """Record a resolved event: from its cloud time, else from its receipt (loop time)."""
        if ack.event_time is not None:
            latency = max(0.0, time.time() - ack.event_time)
        else:
            latency = max(0.0, loop_clock() - ack.received_at)
        self.event_latency.observe(latency)
        self._latencies.append(latency)
        if len(self._latencies) > 10_000:
            del self._latencies[:5_000]

    def recent_latency(self) -> tuple[float, float] | None:
        """p50 and p99 of recent event-to-commit latencies (for the status line)."""
        if not self._latencies:
            return None
        data = sorted(self._latencies[-2000:])
        return data[len(data) // 2], data[min(len(data) - 1, int(len(data) * 0.99))]

    def register_pipeline(
        self,
        *,
        batcher_stats: Callable[[], Mapping[str, Any]],
        pending: Callable[[], Mapping[str, int]],
        catchers: Sequence[CatcherProbe],
        providers: Mapping[str, ProviderStats] | None = None,
    ) -> None:
        self.registry.register(PipelineCollector(batcher_stats, pending, catchers))
        self.registry.register(ProviderCollector(dict(providers or {})))

    def register_ownership(self, ownership: OwnershipView) -> None:
        """``refreshd_manager_owned``, ``refreshd_manager_owned_since_seconds`` and
        ``refreshd_ownership_changes`` for this process (docs/scaling.md)."""
        self.registry.register(OwnershipCollector(ownership))


_go_float: Callable[[float], str] = floatToGoString
"""A bucket bound as prometheus_client writes it in ``le`` (``+Inf``, ``0.01``)."""


class EventLatencies(Collector):
    """Event-to-commit latencies: ``refreshd_event_commit_latency_seconds`` (a histogram)
    and ``refreshd_events_committed`` (a counter: its count).

    Observed once per event, so kept in plain numbers -- a bisection and two
    additions, no lock (observations and scrapes both run on the event loop)
    -- and exported at scrape time with the samples prometheus_client's
    Histogram and Counter would give (buckets, count, sum; no ``_created``).
    """

    HISTOGRAM = "refreshd_event_commit_latency_seconds"
    COUNTER = "refreshd_events_committed"

    def __init__(self, buckets: Sequence[float]) -> None:
        self._bounds = (*sorted(buckets), math.inf)
        self._le = tuple(_go_float(bound) for bound in self._bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, latency: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, latency)] += 1
        self._sum += latency

    def describe(self) -> Iterable[Metric]:
        return self._metrics()

    def collect(self) -> Iterable[Metric]:
        return self._metrics()

    def _metrics(self) -> list[Metric]:
        name = self.HISTOGRAM
        histogram = Metric(
            name,
            "From the cloud's event time (or receipt when it has none) to the refresh commit",
            "histogram",
        )
        count = 0
        for le, n in zip(self._le, self._counts, strict=True):
            count += n
            histogram.add_sample(f"{name}_bucket", {"le": le}, float(count))
        histogram.add_sample(f"{name}_count", {}, float(count))
        histogram.add_sample(f"{name}_sum", {}, self._sum)
        counter = CounterMetricFamily(self.COUNTER, "Events whose targets were all committed")
        counter.add_metric([], float(count))
        return [histogram, counter]


class MeteredSink:
    """Wraps the batcher: every event's Ack records its latency when it resolves."""

    def __init__(self, sink: TargetSink, metrics: Metrics, clock: Callable[[], float]) -> None:
        self._sink = sink
        self._metrics = metrics
        self._clock = clock
        self._observe = self._observe_ack
        """One bound method shared by every Ack (not a closure per event)."""
        self.events_submitted = 0

    def submit(self, targets: Sequence[Target], ack: Ack) -> None:
        self._sink.submit(targets, ack)
        self.events_submitted += 1
        ack.add_done_callback(self._observe)

    def submit_many(self, events: Sequence[tuple[Sequence[Target], Ack]]) -> int:
        queued = self._sink.submit_many(events)
        self.events_submitted += queued
        observe = self._observe
        for index in range(queued):
            events[index][1].add_done_callback(observe)
        return queued

    def has_room(self) -> bool:
        return self._sink.has_room()

    async def wait_for_room(self) -> None:
        await self._sink.wait_for_room()

    def _observe_ack(self, ack: Ack) -> None:
        self._metrics.observe_ack(ack, loop_clock=self._clock)
