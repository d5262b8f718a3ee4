"""A server's Retry-After is honoured, but never for longer than the configured cap.

The AwesomeCloud simulator answers 429 with ``Retry-After: 600``; the client waits
``retry_after_max`` instead (waits go to a recording sleep), and the batcher's
backoff honours a provider's retry hint only up to ``retry_max``.
"""

from __future__ import annotations

import random

from daemon.pipeline.backoff import Backoff
from providers.awesome_cloud.simulator.app import FaultPlan
from providers.awesome_cloud.simulator.server import SimulatorServer
from tests.test_awesome_client import RecordingSleep, client_for, server

__all__ = ["server"]  # the simulator fixture


async def test_a_retry_after_of_600_seconds_is_capped_by_default(server: SimulatorServer) -> None:
    server.faults.set(FaultPlan(error_rate=1, status=429, retry_after=600, count=2))
    sleep = RecordingSleep()
    async with client_for(server, sleep) as client:
        items, _ = await client.get_page("vms", limit=10)
    assert sleep.delays == [60.0, 60.0]
    assert len(items) == 10


async def test_retry_after_max_is_the_longest_wait(server: SimulatorServer) -> None:
    server.faults.set(FaultPlan(error_rate=1, status=503, retry_after=600, count=1))
    sleep = RecordingSleep()
    async with client_for(server, sleep, retry_after_max=5) as client:
        await client.get_page("flavors", limit=5)
    assert sleep.delays == [5.0]


class Throttled(Exception):
    retry_after = 600.0


def test_the_batcher_honours_a_retry_hint_only_up_to_retry_max() -> None:
    backoff = Backoff(initial=1.0, maximum=300.0, multiplier=2.0, jitter=0.0)
    rng = random.Random(0)
    assert backoff.delay_after(Throttled(), 1, rng=rng) == 300.0
    short = Throttled()
    short.retry_after = 20.0
    assert backoff.delay_after(short, 1, rng=rng) == 20.0
