"""What an operator scrapes from ``/metrics`` of a running daemon (SQLite, embedded cloud)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.model.catcher import CatcherStats
from daemon.service.config import parse_config
from daemon.service.lifecycle import Daemon
from daemon.service.metrics import Metrics
from daemon.service.scrape_collectors import CatcherProbe
from daemon.service.version import refreshd_version
from providers.awesome_cloud.simulator.app import FaultPlan
from providers.awesome_cloud.simulator.cloud import Cloud
from providers.awesome_cloud.simulator.server import SimulatorServer
from tests.daemon_process import free_port, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
FULL = (
    "refreshd_manager_last_success_timestamp_seconds",
    (("kind", "full"), ("manager", "awesome")),
)


def daemon_config(tmp_path: Path, port: int) -> dict[str, object]:
    return {
        "database_url": f"sqlite:///{tmp_path / 'r.db'}",
        "batching": {"debounce": 0.01, "max_delay": 0.1},
        "http": {"listen": f"127.0.0.1:{port}"},
        "managers": [
            {
                "name": "awesome",
                "provider": "awesome_cloud",
                "endpoint": "embedded",
                "embedded_vms": 10,
                "refresh_interval": "1h",
            },
        ],
        "catchers": [{"type": "inprocess", "manager": "awesome", "name": "cloud-events"}],
    }


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, str]]:
    port = free_port()
    d = Daemon(parse_config(daemon_config(tmp_path, port)))
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        await wait_for(lambda: d.readiness.ready or task.done(), timeout=30, what="ready")
        assert not task.done(), task.exception() if task.done() else ""
        yield d, f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


async def scrape(url: str) -> tuple[str, Samples]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    return text, samples


async def test_metrics_say_how_fresh_each_manager_is(daemon: tuple[Daemon, str]) -> None:
    _, url = daemon
    before = time.time()

    async def refreshed() -> bool:
        return (await scrape(url))[1].get(FULL, 0) > 0

    await wait_for(refreshed, timeout=30, what="the start-up full refresh")
    _, samples = await scrape(url)
    assert before - 60 < samples[FULL] <= time.time()
    interval = ("refreshd_manager_refresh_interval_seconds", (("manager", "awesome"),))
    assert samples[interval] == 3600
    assert samples[("refreshd_build_info", (("version", refreshd_version()),))] == 1
    assert samples[("refreshd_catcher_up", (("catcher", "cloud-events"),))] == 1


async def test_freshness_survives_a_restart(tmp_path: Path) -> None:
    """The gauge is seeded from refresh_runs: a restarted daemon does not look stale."""
    port = free_port()
    config = parse_config(daemon_config(tmp_path, port))

    async def run_once(*, wait_for_refresh: bool) -> float:
        d = Daemon(config)
        stop = asyncio.Event()
        task = asyncio.create_task(d.run(stop))
        try:
            await wait_for(lambda: d.readiness.ready or task.done(), timeout=30, what="ready")
            if wait_for_refresh:
                await wait_for(lambda: d.refreshes_ok > 0, timeout=30, what="start-up refresh")
            return (await scrape(f"http://127.0.0.1:{port}"))[1][FULL]
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 30) == 0

    first = await run_once(wait_for_refresh=True)
    second = await run_once(wait_for_refresh=False)  # before any refresh of this process
    assert first > 0 and second > 0
    assert abs(second - first) < 60


async def test_metrics_label_per_manager_and_leave_out_created_series(
    daemon: tuple[Daemon, str],
) -> None:
    d, url = daemon
    await wait_for(lambda: d.refreshes_ok > 0, timeout=30, what="the start-up full refresh")
    text, samples = await scrape(url)
    assert "_created" not in text
    rows = (
        "refreshd_rows_written_total",
        (("action", "created"), ("collection", "vms"), ("manager", "awesome")),
    )
    assert samples[rows] == 10
    duration = (
        "refreshd_refresh_duration_seconds_count",
        (("kind", "full"), ("manager", "awesome")),
    )
    assert samples[duration] >= 1
    # provider API: the embedded cloud was asked for each listed collection (4) at least once
    requests = samples[("refreshd_provider_api_requests_total", (("manager", "awesome"),))]
    assert requests >= 4
    assert samples[("refreshd_provider_api_throttled_total", (("manager", "awesome"),))] == 0
    # the consumer lag names its stream and partition in two labels
    lag = [labels for name, labels in samples if name == "refreshd_consumer_lag"]
    assert lag and all(dict(labels).keys() == {"catcher", "topic", "partition"} for labels in lag)
    # process and Python collectors
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total"):
        assert any(n == name for n, _ in samples), name
    assert any(n == "python_info" for n, _ in samples)
    assert any(n == "python_gc_collections_total" for n, _ in samples)


async def test_throttled_cloud_answers_are_counted_per_manager(tmp_path: Path) -> None:
    cloud = Cloud.generate(vms=5, seed=3)
    async with SimulatorServer(cloud) as server:
        port = free_port()
        config = daemon_config(tmp_path, port)
        config["managers"] = [
            {"name": "remote", "provider": "awesome_cloud", "endpoint": server.url, "retries": 3}
        ]
        config["catchers"] = []
        d = Daemon(parse_config(config))
        stop = asyncio.Event()
        task = asyncio.create_task(d.run(stop))
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_for(lambda: d.refreshes_ok > 0, timeout=30, what="start-up refresh")
            server.faults.set(FaultPlan(error_rate=1, status=429, retry_after=0, count=2))
            async with (
                aiohttp.ClientSession() as s,
                s.post(url + "/refresh?wait=true", json={"manager": "remote"}) as resp,
            ):
                assert resp.status == 200
            _, samples = await scrape(url)
            label = (("manager", "remote"),)
            assert samples[("refreshd_provider_api_throttled_total", label)] == 2
            assert samples[("refreshd_provider_api_requests_total", label)] >= 2 * 4 + 2
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 30) == 0


def test_kafka_lag_names_topic_and_partition_apart() -> None:
    """A Kafka catcher reports lag per "topic/partition"; the metric has both labels."""
    metrics = Metrics()
    stats = CatcherStats(received=3, lag={"cloud.events/3": 7, "other/topic/0": 1})
    metrics.register_pipeline(
        batcher_stats=dict,
        pending=dict,
        catchers=[CatcherProbe("kafka-a", lambda: stats, lambda: False)],
    )
    text = generate_latest(metrics.registry).decode()
    assert 'refreshd_consumer_lag{catcher="kafka-a",partition="3",topic="cloud.events"} 7.0' in text
    assert 'refreshd_consumer_lag{catcher="kafka-a",partition="0",topic="other/topic"} 1.0' in text
    assert 'refreshd_catcher_up{catcher="kafka-a"} 0.0' in text
