"""Scrape-time collectors: pipeline, catcher, provider and ownership counters read when scraped.

Flow: batcher stats, catchers' :class:`~daemon.model.catcher.CatcherStats`, provider
connections' ``api_stats()``, ownership -> **collectors** -> ``/metrics``.

These counters live in the pipeline's own objects, so the pipeline never imports
prometheus: each collector reads them (catchers' by attribute) at every scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.model.catcher import CatcherStats
from daemon.persistence.fencing import Holding

ProviderStats = Callable[[], Mapping[str, int]]
"""A manager connection's ``api_stats()``: ``{"requests": n, "throttled": n}`` so far."""


@dataclass(frozen=True, slots=True)
class CatcherProbe:
    """What metrics read from one catcher at scrape time."""

    name: str
    stats: Callable[[], CatcherStats]
    healthy: Callable[[], bool]


def split_stream(key: object) -> tuple[str, str]:
    """A lag key -> ``(topic, partition)``: ``"orders/3"`` -> ``("orders", "3")``;
    a key without a partition (an SQS queue, an in-process log) -> ``(key, "")``."""
    if isinstance(key, tuple) and len(key) == 2:
        return str(key[0]), str(key[1])
    topic, sep, partition = str(key).rpartition("/")
    if sep and partition.isdigit():
        return topic, partition
    return str(key), ""


class PipelineCollector(Collector):
    def __init__(
        self,
        batcher_stats: Callable[[], Mapping[str, Any]],
        pending: Callable[[], Mapping[str, int]],
        catchers: Sequence[CatcherProbe],
    ) -> None:
        self._batcher_stats = batcher_stats
        self._pending = pending
        self._catchers = catchers

    def collect(self) -> Iterable[Metric]:
        stats = self._batcher_stats()
        for key, help_ in (
            ("targets_enqueued", "Targets handed to the batcher"),
            ("targets_coalesced", "Targets merged into one already pending"),
        ):
            c = CounterMetricFamily(f"refreshd_{key}", help_)
            c.add_metric([], float(stats.get(key, 0)))
            yield c
        g = GaugeMetricFamily("refreshd_pending_targets", "Targets waiting", labels=["manager"])
        for manager, n in self._pending().items():
            g.add_metric([manager], float(n))
        yield g
        up = GaugeMetricFamily(
            "refreshd_catcher_up",
            "1 while the catcher runs and reads its stream, 0 when its loop died or lost it",
            labels=["catcher"],
        )
        received = CounterMetricFamily(
            "refreshd_events_received", "Events read by catchers", labels=["catcher"]
        )
        decoded = CounterMetricFamily(
            "refreshd_events_decoded", "Events decoded and mapped", labels=["catcher"]
        )
        skipped = CounterMetricFamily(
            "refreshd_events_skipped",
            "Events decoded that asked for nothing to refresh (event kinds refreshd ignores)",
            labels=["catcher"],
        )
        dead = CounterMetricFamily(
            "refreshd_events_dead_lettered",
            "Events sent to the dead-letter destination",
            labels=["catcher", "reason"],
        )
        lag = GaugeMetricFamily(
            "refreshd_consumer_lag",
            "Messages behind the stream's end",
            labels=["catcher", "topic", "partition"],
        )
        resets = CounterMetricFamily(
            "refreshd_kafka_offset_resets",
            "Partition positions that no longer fitted the log (out of range, beyond the"
            " highwater) and were reset; each asks for a full refresh",
            labels=["catcher", "topic", "partition"],
        )
        for probe in self._catchers:
            name, s = probe.name, probe.stats()
            up.add_metric([name], 1.0 if probe.healthy() else 0.0)
            for stream, n in s.offset_resets.items():
                resets.add_metric([name, *split_stream(stream)], float(n))
            received.add_metric([name], float(s.received))
            decoded.add_metric([name], float(s.decoded))
            skipped.add_metric([name], float(s.skipped))
            for reason, n in s.dead_lettered.items():
                dead.add_metric([name, str(reason)], float(n))
            for stream, n in s.lag.items():
                lag.add_metric([name, *split_stream(stream)], float(n))
        yield from (up, received, decoded, skipped, dead, lag, resets)


class ProviderCollector(Collector):
    """Cloud API requests and throttled answers per manager, read from its connection."""

    def __init__(self, providers: Mapping[str, ProviderStats]) -> None:
        self._providers = providers

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "refreshd_provider_api_requests",
            "Requests sent to the cloud API (each retry counts)",
            labels=["manager"],
        )
        throttled = CounterMetricFamily(
            "refreshd_provider_api_throttled",
            "Cloud API answers that asked to slow down (HTTP 429, throttling codes)",
            labels=["manager"],
        )
        for manager, read in sorted(self._providers.items()):
            s = read()
            requests.add_metric([manager], float(s.get("requests", 0)))
            throttled.add_metric([manager], float(s.get("throttled", 0)))
        yield from (requests, throttled)


class OwnershipView(Protocol):
    instance: str

    def holdings(self) -> Mapping[str, Holding]: ...

    @property
    def changes(self) -> Mapping[tuple[str, str], int]: ...


class OwnershipCollector(Collector):
    def __init__(self, ownership: OwnershipView) -> None:
        self._ownership = ownership

    def collect(self) -> Iterable[Metric]:
        o = self._ownership
        holdings = o.holdings()
        owned = GaugeMetricFamily(
            "refreshd_manager_owned",
            "1 while this process owns the manager (may refresh it), labelled with its instance",
            labels=["manager", "owner"],
        )
        since = GaugeMetricFamily(
            "refreshd_manager_owned_since_seconds",
            "Unix time this process took the manager",
            labels=["manager", "owner"],
        )
        for manager, h in sorted(holdings.items()):
            owned.add_metric([manager, o.instance], 1.0)
            since.add_metric([manager, o.instance], h.since.timestamp())
        yield owned
        yield since
        changes = CounterMetricFamily(
            "refreshd_ownership_changes",
            "Managers taken (acquired), given back (released) or lost with the connection",
            labels=["manager", "change"],
        )
        for (manager, change), n in sorted(o.changes.items()):
            changes.add_metric([manager, change], float(n))
        yield changes
