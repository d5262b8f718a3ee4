"""Many daemons, one database (DESIGN.md 6 and 12; docs/scaling.md): real `refreshd run`
processes, real PostgreSQL, the Tansu broker, AwesomeCloud simulators.

* start-up race: three processes started together on an empty database do one
  full refresh per manager;
* stale write: a full refresh collected slowly by one process never overwrites
  what another process committed from a newer change;
* SIGKILL of the process holding a manager in the middle of a refresh: another
  process takes the manager over, no event is lost, full refreshes are not
  multiplied;
* rolling restart with SIGTERM while events flow: nothing is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from providers.awesome_cloud.simulator.app import FaultPlan
from tests.cloud_state import assert_database_equals_cloud
from tests.daemon_process import wait_for
from tests.scaleout_cluster import Cluster, make_cluster

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ClusterFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def cluster(tmp_path: Path, pg_url: str) -> AsyncIterator[ClusterFactory]:
    made: list[Cluster] = []

    async def make(**kwargs: Any) -> Cluster:
        c = await make_cluster(tmp_path, pg_url, **kwargs)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            await c.close()
            for i, d in enumerate(c.daemons):
                print(f"---- p{i} log (tail) ----\n" + d.log()[-4000:])


@pytest.fixture
async def kafka(
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[..., Awaitable[str]],
    kafka_group_id: str,
) -> tuple[str, str, str]:
    return kafka_bootstrap, await kafka_topic_factory(partitions=2), kafka_group_id


async def test_three_processes_starting_together_do_one_full_refresh_per_manager(
    cluster: ClusterFactory,
) -> None:
    c = await cluster(processes=3, managers=2, vms=50)
    await c.start()

    def decided() -> bool:
        # every process's scheduler decides each manager once: it queues the full
        # refresh, or finds (under the manager's ownership) that another did it
        return all(
            c.count_in_logs(f"manager {m}: scheduled full refresh")
            + c.count_in_logs(f"manager {m}: full refresh already done by another process")
            == 3
            for m in c.managers
        )

    await wait_for(decided, timeout=60, interval=0.2, what="every scheduler to decide")
    for m in c.managers:
        await wait_for(lambda m=m: c.full_refreshes(m), timeout=30, what=f"{m} refreshed")
        assert c.count_in_logs(f"manager {m}: scheduled full refresh") == 1
        assert len(await c.runs(m, "full")) == 1
    assert await c.converged()


async def test_a_slowly_collected_refresh_never_overwrites_a_newer_commit(
    cluster: ClusterFactory,
) -> None:
    # p0 reads the cloud through a slowed server, p1 through a fast one
    c = await cluster(processes=2, managers=1, vms=20, slow=[0])
    await c.start()
    await wait_for(lambda: c.full_refreshes("m0"), timeout=60, what="the start-up full refresh")
    await wait_for(lambda: _idle(c, "m0"), timeout=60, what="start-up refreshes to finish")
    before = len(await c.runs("m0"))
    cloud, slow = c.clouds["m0"], c.slow_servers["m0"]
    slow.faults.set(FaultPlan(latency_ms=800))
    asked = slow.stats.count("flavors", "ids")
    victim = sorted(cloud.ids("vms"))[0]

    # p0 refreshes the vm (a targeted refresh collects everything before it writes) ...
    assert await c.post_refresh(0, "m0", [f"vms:{victim}"]) == 202
    # ... it has read the vm once it asks for the vm's flavor
    await wait_for(
        lambda: slow.stats.count("flavors", "ids") > asked,
        timeout=60,
        what="p0 to have read the vm",
    )
    # while p0 refreshes, every process shows that p0 holds m0, and since when
    views = [(await c.managers_view(i))["m0"] for i in (0, 1)]
    assert [(v["owner"], v["owned_here"], v["refreshing"]) for v in views] == [
        ("p0", True, True),
        ("p0", False, False),
    ]
    assert views[0]["owner_since"] == views[1]["owner_since"] is not None
    assert await c.daemons[0].metric("refreshd_manager_owned", {"manager": "m0"}) == 1
    assert await c.daemons[1].metric("refreshd_manager_owned", {"manager": "m0"}) == 0
    cloud.delete("vms", victim)
    # p1 refreshes the deleted vm (as its event would make it) while p0 still collects
    assert await c.post_refresh(1, "m0", [f"vms:{victim}"], wait=True) == 200

    async def both_committed() -> bool:
        return len(await c.runs("m0")) >= before + 2 and await _idle(c, "m0")

    await wait_for(both_committed, timeout=60, what="both refreshes to commit")
    await assert_database_equals_cloud(c.engine, "m0", cloud, context="after both refreshes")


async def _idle(c: Cluster, manager: str) -> bool:
    """No live process refreshes ``manager`` or has targets of it pending."""
    for i, d in enumerate(c.daemons):
        view = (await c.managers_view(i))[manager] if d.alive() else None
        if view and (view["refreshing"] or view["pending_targets"]):
            return False
    return True


@pytest.mark.kafka
async def test_killing_the_holder_of_a_manager_mid_refresh_hands_it_over(
    cluster: ClusterFactory, kafka: tuple[str, str, str]
) -> None:
    c = await cluster(processes=3, managers=2, vms=100, kafka=kafka)
    await c.start()
    for m in c.managers:
        await wait_for(lambda m=m: c.full_refreshes(m), timeout=60, what=f"{m} full refresh")
    c.churn(per_second=15)
    for m in c.managers:
        await wait_for(
            lambda m=m: _targeted_ok(c, m, 3), timeout=60, what=f"{m} targeted refreshes"
        )

    # refreshes take long enough to be killed in the middle of one
    for server in c.servers.values():
        server.faults.set(FaultPlan(latency_ms=300))
    owners = await wait_for(lambda: c.owners(), timeout=30, what="an owner")
    manager, holder = sorted(owners.items())[0]
    index = int(holder.removeprefix("p"))
    await wait_for(
        lambda: _refreshing_on(c, index, manager), timeout=30, what=f"{holder} refreshing"
    )
    killed_at = time.monotonic()
    await c.kill(index)

    async def taken_over() -> bool:
        now = await c.owners()
        return manager in now and now[manager] != holder

    await wait_for(taken_over, timeout=30, interval=0.1, what=f"{manager} taken over")
    takeover = time.monotonic() - killed_at
    print(f"{manager}: taken over {takeover:.2f}s after SIGKILL of {holder}")
    for server in c.servers.values():
        server.faults.clear()

    c.daemons[index].start()  # the killed process comes back
    await c.daemons[index].wait_ready(timeout=60)
    await asyncio.sleep(0)  # let the churn keep going while it rejoins
    await wait_for(lambda: _targeted_ok(c, manager, 10), timeout=60, what="more refreshes")
    for task in c.tasks[len(c.deliveries) :]:
        task.cancel()
    await c.delivered()
    await wait_for(c.converged, timeout=90, interval=0.25, what="the database to equal the clouds")
    for m in c.managers:  # only the start-up one: convergence came from events alone
        assert await c.full_refreshes(m) == 1, await c.runs(m, "full")


async def _targeted_ok(c: Cluster, manager: str, n: int) -> bool:
    return sum(1 for r in await c.runs(manager, "targeted") if r.error is None) >= n


async def _refreshing_on(c: Cluster, index: int, manager: str) -> bool:
    view = (await c.managers_view(index))[manager]
    return bool(view["refreshing"] and view["owned_here"])


@pytest.mark.kafka
async def test_a_rolling_restart_with_sigterm_loses_nothing(
    cluster: ClusterFactory, kafka: tuple[str, str, str]
) -> None:
    c = await cluster(processes=3, managers=2, vms=100, kafka=kafka)
    await c.start()
    for m in c.managers:
        await wait_for(lambda m=m: c.full_refreshes(m), timeout=60, what=f"{m} full refresh")
    c.churn(per_second=15)
    for i in range(len(c.daemons)):
        before = {m: len(await c.runs(m, "targeted")) for m in c.managers}
        assert await c.terminate(i) == 0
        # what it read was committed before it left: the next owner does not read it again
        assert c.daemons[i].log().count("all refreshes committed") == 1
        c.daemons[i].start()
        await c.daemons[i].wait_ready(timeout=60)

        async def progressed(before: dict[str, int] = before) -> bool:
            now = {m: len(await c.runs(m, "targeted")) for m in c.managers}
            return all(now[m] > before[m] for m in c.managers)

        await wait_for(progressed, timeout=60, what=f"refreshes after restarting p{i}")
    for task in c.tasks[len(c.deliveries) :]:
        task.cancel()
    await c.delivered()
    await wait_for(c.converged, timeout=90, interval=0.25, what="the database to equal the clouds")
    for m in c.managers:
        assert await c.full_refreshes(m) == 1, await c.runs(m, "full")
