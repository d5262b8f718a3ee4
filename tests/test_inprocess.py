"""The in-process catcher: a real simulator Cloud's events reach the real Batcher.

The refresh behind the batcher records every TargetCollection and can be
held on a gate.  Waits are on conditions under a timeout, never on sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from random import Random
from typing import Any

import pytest

from catchers.inprocess import InProcessCatcher, create
from daemon.model.catcher import CatcherContext, ManagerEndpoint
from daemon.model.targets import TargetCollection
from daemon.pipeline.batcher import Batcher, BatchingSettings
from providers.awesome_cloud import AwesomeCloudSettings, provider
from providers.awesome_cloud.events import map_event
from providers.awesome_cloud.simulator.cloud import Cloud

WAIT = 10.0


class GatedRefresh:
    """Records every TargetCollection; each refresh waits until the gate is open."""

    def __init__(self) -> None:
        self.calls: list[TargetCollection] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, collection: TargetCollection) -> None:
        self.calls.append(collection)
        await self.gate.wait()

    def refs(self) -> set[str]:
        return {str(t) for c in self.calls for t in c}


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait (under a timeout) until ``predicate()`` holds."""
    try:
        async with asyncio.timeout(WAIT):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


@dataclass
class Embedded:
    """Stands for a provider connection whose endpoint is embedded."""

    cloud: Cloud | None


@dataclass
class Harness:
    cloud: Cloud
    catcher: InProcessCatcher
    batcher: Batcher
    refresh: GatedRefresh

    def vm_refs(self) -> set[str]:
        return {f"awesome:vms:{vm_id}" for vm_id in self.cloud.ids("vms")}


Make = Callable[..., Awaitable[Harness]]


def context_for(sink: Any, connection: Any) -> CatcherContext:
    return CatcherContext(
        sink=sink,
        managers={"awesome": ManagerEndpoint("awesome", "awesome_cloud", map_event, connection)},
        clock=asyncio.get_running_loop().time,
    )


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    opened: list[Harness] = []

    async def build(
        options: dict[str, Any] | None = None,
        *,
        cloud: Cloud | None = None,
        settings: BatchingSettings | None = None,
        start: bool = True,
    ) -> Harness:
        cloud = cloud or Cloud.generate(vms=5, seed=1)
        refresh = GatedRefresh()
        batcher = Batcher(refresh, settings=settings or BatchingSettings(debounce=0.0))
        batcher.start()
        catcher = create(
            {"manager": "awesome", **(options or {})}, context_for(batcher, Embedded(cloud))
        )
        if start:
            await catcher.start()
        harness = Harness(cloud, catcher, batcher, refresh)
        opened.append(harness)
        return harness

    yield build
    for h in opened:
        h.refresh.gate.set()
        await h.catcher.close()
        await h.batcher.close(cancel=True)


def create_vms(cloud: Cloud, n: int) -> list[str]:
    return [cloud.create("vms", {"name": f"new-{i}"})["id"] for i in range(n)]


async def test_events_of_the_cloud_reach_the_batcher_as_targets(make: Make) -> None:
    h = await make()
    vm_id = h.cloud.ids("vms")[0]

    h.cloud.update("vms", vm_id, {"state": "stopped"})
    h.cloud.update("images", "image-01", {"name": "renamed"})
    h.cloud.delete("flavors", "flavor-08")
    (new_vm,) = create_vms(h.cloud, 1)

    expected = {
        f"awesome:vms:{vm_id}",
        "awesome:images:image-01",
        "awesome:flavors:flavor-08",
        f"awesome:vms:{new_vm}",
    }
    await until(lambda: expected <= h.refresh.refs(), "every changed object was refreshed")
    await until(lambda: h.catcher.stats().acknowledged == 4, "every event acknowledged")
    stats = h.catcher.stats()
    assert h.catcher.cursor == h.cloud.last_sequence == 4
    assert (stats.received, stats.decoded, stats.submitted) == (4, 4, 4)
    assert stats.dropped == stats.skipped == stats.lost == 0
    assert stats.lag == {"awesome": 0}
    first = next(t for c in h.refresh.calls for t in c if t.manager_ref["ems_ref"] == vm_id)
    assert first.event_id is not None


async def test_events_before_start_are_read_too(make: Make) -> None:
    cloud = Cloud.generate(vms=3, seed=2)
    created = create_vms(cloud, 3)

    h = await make(cloud=cloud)

    await until(
        lambda: {f"awesome:vms:{v}" for v in created} <= h.refresh.refs(), "backlog refreshed"
    )


async def test_a_new_event_wakes_the_loop_without_polling(make: Make) -> None:
    h = await make({"poll_interval": "1h"})
    await until(lambda: h.catcher.stats().lag == {"awesome": 0}, "the catcher is idle")

    (vm_id,) = create_vms(h.cloud, 1)

    await until(lambda: f"awesome:vms:{vm_id}" in h.refresh.refs(), "the new vm was refreshed")


async def test_under_backpressure_no_event_is_skipped(make: Make) -> None:
    h = await make(settings=BatchingSettings(debounce=0.0, max_pending_targets=2))
    h.refresh.gate.clear()
    created = create_vms(h.cloud, 30)
    await until(lambda: h.catcher.stats().backpressure_waits > 0, "the catcher waits for room")
    assert h.catcher.cursor < h.cloud.last_sequence
    assert h.batcher.pending_count() <= 2

    h.refresh.gate.set()

    wanted = {f"awesome:vms:{v}" for v in created}
    await until(lambda: wanted <= h.refresh.refs(), "every created vm was refreshed")
    assert h.catcher.cursor == h.cloud.last_sequence
    stats = h.catcher.stats()
    assert stats.submitted == stats.received == 30
    assert stats.dropped == 0


async def test_drop_rate_one_drops_every_event_and_counts_it(make: Make) -> None:
    h = await make({"drop_rate": 1})

    h.cloud.churn(Random(5), 25)

    await until(lambda: h.catcher.cursor == h.cloud.last_sequence == 25, "all events read")
    stats = h.catcher.stats()
    assert stats.dropped == stats.received == 25
    assert stats.submitted == 0
    assert h.refresh.calls == []


async def test_drop_rate_is_seeded_and_drops_a_share(make: Make) -> None:
    async def dropped_with(seed: int) -> tuple[int, int]:
        h = await make({"drop_rate": 0.5, "seed": seed}, cloud=Cloud.generate(vms=5, seed=1))
        create_vms(h.cloud, 40)
        await until(lambda: h.catcher.cursor == h.cloud.last_sequence, "all events read")
        stats = h.catcher.stats()
        assert stats.dropped + stats.submitted == stats.received == 40
        return stats.dropped, stats.submitted

    first = await dropped_with(3)
    again = await dropped_with(3)

    assert first == again
    assert 0 < first[0] < 40


async def test_events_that_left_the_log_unread_ask_for_a_full_refresh(make: Make) -> None:
    cloud = Cloud.generate(vms=3, seed=4, max_events=2)
    created = create_vms(cloud, 6)  # the log keeps only the newest few

    oldest_kept = cloud.events_after(0).events[0]["sequence"]
    assert oldest_kept > 1

    h = await make(cloud=cloud)

    await until(lambda: h.catcher.cursor == cloud.last_sequence == 6, "the rest was read")
    await until(lambda: bool(h.refresh.calls), "a refresh ran")
    assert h.refresh.calls[0].is_full
    assert h.catcher.stats().lost == oldest_kept - 1
    assert h.catcher.stats().submitted == 1 + len(created) - (oldest_kept - 1)


async def test_events_the_mapper_refuses_are_counted_and_passed_over(make: Make) -> None:
    h = await make(start=False)
    refresh = h.refresh

    def picky(manager: str, event: dict[str, Any]) -> list[Any]:
        if event["type"].startswith("com.awesomecloud.image."):
            raise ValueError("no images, thanks")
        return list(map_event(manager, event))

    connection: Any = Embedded(h.cloud)
    context = CatcherContext(
        sink=h.batcher,
        managers={"awesome": ManagerEndpoint("awesome", "p", picky, connection)},
        clock=asyncio.get_running_loop().time,
    )
    catcher = create({"manager": "awesome"}, context)
    await catcher.start()
    try:
        created = create_vms(h.cloud, 2)
        h.cloud.update("images", "image-01", {"name": "x"})
        await until(lambda: catcher.cursor == h.cloud.last_sequence, "all events read")
    finally:
        await catcher.close()
    await until(lambda: {f"awesome:vms:{v}" for v in created} <= refresh.refs(), "vms refreshed")
    assert catcher.stats().dead_lettered == {"mapper_error": 1}
    assert "awesome:images:image-01" not in refresh.refs()


async def test_stop_stops_reading(make: Make) -> None:
    h = await make()
    create_vms(h.cloud, 1)
    await until(lambda: h.catcher.cursor == 1, "the first event was read")

    await h.catcher.stop()
    create_vms(h.cloud, 2)

    assert h.catcher.cursor == 1
    assert h.catcher.stats().lag == {"awesome": 2}
    assert h.catcher.healthy()
    await h.catcher.close()  # idempotent


async def test_reads_the_cloud_of_a_real_embedded_connection() -> None:
    connection = provider.connect(
        "awesome", AwesomeCloudSettings(endpoint="embedded", embedded_vms=3)
    )
    refresh = GatedRefresh()
    async with connection, Batcher(refresh, settings=BatchingSettings(debounce=0.0)) as batcher:
        catcher = create({"manager": "awesome"}, context_for(batcher, connection))
        await catcher.start()
        try:
            cloud = connection.cloud
            assert cloud is not None
            (vm_id,) = create_vms(cloud, 1)
            await until(lambda: f"awesome:vms:{vm_id}" in refresh.refs(), "the vm was refreshed")
        finally:
            await catcher.close()


def test_a_remote_endpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="inprocess catcher needs an embedded endpoint"):
        create({"manager": "awesome"}, _static_context(Embedded(None)))
    # no connection at all: check-config validating options before anything is open
    assert create({"manager": "awesome"}, _static_context(None)).name == "inprocess"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "manager"),
        ({"manager": "nope"}, "unknown manager 'nope'"),
        ({"manager": "awesome", "drop_rate": 1.5}, "drop_rate"),
        ({"manager": "awesome", "batch_size": 0}, "batch_size"),
        ({"manager": "awesome", "colour": "red"}, "colour"),
    ],
)
def test_bad_options_raise_value_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create(options, _static_context(Embedded(Cloud())))


def _static_context(connection: Any) -> CatcherContext:
    class NoSink:
        def submit(self, targets: Any, ack: Any) -> None: ...
        def has_room(self) -> bool:
            return True

        async def wait_for_room(self) -> None: ...

    return CatcherContext(
        sink=NoSink(),
        managers={"awesome": ManagerEndpoint("awesome", "awesome_cloud", map_event, connection)},
        clock=lambda: 0.0,
    )
