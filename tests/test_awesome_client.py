"""The AwesomeCloud HTTP client against the simulator's fault injection.

Waits between retries go to a recording sleep, so no test waits for backoff.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from random import Random
from typing import Any

import pytest

from daemon.model.provider import ProviderAuthError, ProviderError
from providers.awesome_cloud.client import AwesomeClient
from providers.awesome_cloud.settings import AwesomeCloudSettings
from providers.awesome_cloud.simulator.app import FaultPlan
from providers.awesome_cloud.simulator.cloud import Cloud
from providers.awesome_cloud.simulator.server import SimulatorServer


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
async def server() -> AsyncIterator[SimulatorServer]:
    cloud = Cloud.generate(vms=30, seed=2)
    async with SimulatorServer(cloud, token="tok", fault_rng=Random(4)) as srv:
        yield srv


def settings(endpoint: str, **overrides: Any) -> AwesomeCloudSettings:
    values: dict[str, Any] = {"endpoint": endpoint, "token": "tok", "retries": 3}
    return AwesomeCloudSettings.model_validate(values | overrides)


def client_for(server: SimulatorServer, sleep: RecordingSleep, **overrides: Any) -> AwesomeClient:
    return AwesomeClient(
        server.url, settings(server.url, **overrides), manager="m1", sleep=sleep, rng=Random(1)
    )


async def test_429_with_retry_after_is_retried_after_the_wait_asked(
    server: SimulatorServer,
) -> None:
    server.faults.set(FaultPlan(error_rate=1, status=429, retry_after=7, count=2))
    sleep = RecordingSleep()
    async with client_for(server, sleep) as client:
        items, token = await client.get_page("vms", limit=10)
    assert sleep.delays == [7.0, 7.0]
    assert [i["id"] for i in items] == server.cloud.ids("vms")[:10]
    assert token == "vm-000010"
    assert server.stats.count("vms") == 3


async def test_503_retry_after_is_honoured_even_beyond_backoff_max(
    server: SimulatorServer,
) -> None:
    server.faults.set(FaultPlan(error_rate=1, status=503, retry_after=30, count=1))
    sleep = RecordingSleep()
    async with client_for(server, sleep, backoff_max=1) as client:
        await client.get_page("flavors", limit=5)
    assert sleep.delays == [30.0]


async def test_500s_are_retried_with_exponential_backoff_then_succeed(
    server: SimulatorServer,
) -> None:
    server.faults.set(FaultPlan(error_rate=1, status=500, count=3))
    sleep = RecordingSleep()
    async with client_for(server, sleep, backoff_initial=0.5, backoff_max=1.5) as client:
        items, _ = await client.get_page("images", limit=100)
    assert len(items) == server.cloud.count("images")
    assert len(sleep.delays) == 3
    for delay, base in zip(sleep.delays, (0.5, 1.0, 1.5), strict=True):
        assert base / 2 <= delay <= base  # equal jitter, capped at backoff_max


async def test_exhausted_retries_raise_a_retryable_error(server: SimulatorServer) -> None:
    server.faults.set(FaultPlan(error_rate=1, status=503))
    sleep = RecordingSleep()
    async with client_for(server, sleep, retries=2) as client:
        with pytest.raises(ProviderError) as caught:
            await client.get_page("vms", limit=10)
    assert caught.value.retryable
    assert "503" in str(caught.value) and f"{server.url}/api/v1/vms" in str(caught.value)
    assert "3 attempts" in str(caught.value)
    assert len(sleep.delays) == 2


async def test_a_404_is_a_clear_permanent_error(server: SimulatorServer) -> None:
    sleep = RecordingSleep()
    async with client_for(server, sleep) as client:
        with pytest.raises(ProviderError) as caught:
            await client.get_page("routers", limit=10)
    assert not caught.value.retryable
    assert not isinstance(caught.value, ProviderAuthError)
    message = str(caught.value)
    assert "/api/v1/routers" in message and "404" in message and "unknown collection" in message
    assert sleep.delays == []


async def test_a_400_is_a_clear_permanent_error(server: SimulatorServer) -> None:
    sleep = RecordingSleep()
    async with client_for(server, sleep) as client:
        with pytest.raises(ProviderError) as caught:
            await client.get_page("vms", limit=0)
    assert not caught.value.retryable
    assert "400" in str(caught.value) and "limit" in str(caught.value)
    assert sleep.delays == []


async def test_a_refused_token_is_an_auth_error(server: SimulatorServer) -> None:
    sleep = RecordingSleep()
    async with client_for(server, sleep, token="wrong") as client:
        with pytest.raises(ProviderAuthError) as caught:
            await client.get_page("vms", limit=10)
    assert not caught.value.retryable
    assert "401" in str(caught.value) and server.url in str(caught.value)
    assert sleep.delays == []


async def test_connection_errors_are_retried(unused_port: int) -> None:
    sleep = RecordingSleep()
    url = f"http://127.0.0.1:{unused_port}"
    async with AwesomeClient(url, settings(url, retries=2), manager="m1", sleep=sleep) as client:
        with pytest.raises(ProviderError) as caught:
            await client.get_page("vms", limit=10)
    assert caught.value.retryable
    assert len(sleep.delays) == 2


async def test_timeouts_are_retried(server: SimulatorServer) -> None:
    server.faults.set(FaultPlan(latency_ms=300))
    sleep = RecordingSleep()
    async with client_for(server, sleep, retries=1, request_timeout=0.05) as client:
        with pytest.raises(ProviderError) as caught:
            await client.get_page("flavors", limit=10)
    assert caught.value.retryable and "Timeout" in str(caught.value)
    assert len(sleep.delays) == 1


async def test_cancellation_during_backoff_propagates(server: SimulatorServer) -> None:
    server.faults.set(FaultPlan(error_rate=1, status=503))
    sleeping = asyncio.Event()

    async def sleep_forever(delay: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()

    client = AwesomeClient(server.url, settings(server.url), manager="m1", sleep=sleep_forever)
    async with client:
        task = asyncio.ensure_future(client.get_page("vms", limit=10))
        await sleeping.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_listing_and_by_ids(server: SimulatorServer) -> None:
    sleep = RecordingSleep()
    async with client_for(server, sleep) as client:
        pages = [page async for page in client.iter_pages("vms", page_size=8)]
        assert [len(p) for p in pages] == [8, 8, 8, 6]
        assert [i["id"] for p in pages for i in p] == server.cloud.ids("vms")
        wanted = ["vm-000005", "vm-000001", "vm-000030", "vm-404", "vm-000005"]
        chunks = [c async for c in client.iter_by_ids("vms", wanted, chunk_size=2)]
    assert [[i["id"] for i in c] for c in chunks] == [["vm-000001", "vm-000005"], ["vm-000030"]]
    assert server.stats.count("vms", "ids") == 2


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
