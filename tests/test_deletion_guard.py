"""The mass-deletion guard holds back only the deletions it refuses (issue 14 item 8).

A full refresh that would remove too much still saves every created and updated
row; targeted refreshes keep flowing; the held deletion is visible (result,
``refresh_runs``, ``/managers``, ``refreshd_deletions_held``) and is applied when
an operator confirms it or a later full refresh agrees on a smaller share.  The
batcher does not retry it: it is not a failed refresh.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.inventory import InventoryPage
from daemon.persistence.db import create_engine
from daemon.persistence.persister import Persister
from daemon.service.config import parse_config
from daemon.service.lifecycle import Daemon
from providers.awesome_cloud.simulator.cloud import Cloud as SimulatedCloud
from providers.awesome_cloud.simulator.server import SimulatorServer
from tests.daemon_process import free_port, wait_for
from tests.inventory_builders import (
    MANAGER,
    fleet,
    manager_row,
    normalize,
    pages,
    runs,
    snapshot,
    vm_targets,
)

TOKEN = "t0ken"


async def test_held_deletion_saves_upserts_and_lets_targeted_refreshes_flow(
    persister: Persister, engine: AsyncEngine
) -> None:
    cloud = fleet(10)
    await persister.save(MANAGER, pages(*cloud.full_pages()))  # 42 rows
    # an outage: the listing answers v0 (renamed) and a new vm, nothing else
    outage = cloud.copy()
    for i in range(1, 10):
        outage.remove_vm(f"v{i}")
    outage.vms["v0"]["name"] = "v0-renamed"
    outage.vm("new", disks=("sda",))

    result = await persister.save(MANAGER, pages(*outage.full_pages()))

    assert result.held_deletion is not None and result.held_deletion.would_remove == 36
    after = await snapshot(engine)
    assert after["vms"]["v0"]["name"] == "v0-renamed"  # updated
    assert after["vms"]["new"]["archived_at"] is None  # created
    assert all(after["vms"][f"v{i}"]["archived_at"] is None for i in range(10))  # kept
    assert result.details() == {"vms": {"created": 1, "updated": 1}, "disks": {"created": 1}}
    run = (await runs(engine))[-1]
    assert run["error"] is None
    assert run["details"]["held_deletion"] == {"rows": 36, "total": 42}

    # targeted refreshes go on meanwhile
    cloud.vms["v5"]["name"] = "v5-new"
    await persister.save(MANAGER, pages(cloud.targeted_page("v5")), targets=vm_targets("v5"))
    assert (await snapshot(engine))["vms"]["v5"]["name"] == "v5-new"

    # the cloud is back and agrees on a small share: applied as usual, nothing held
    cloud.vms["v0"]["name"] = "v0-renamed"
    cloud.vm("new", disks=("sda",)).remove_vm("v9")
    result = await persister.save(MANAGER, pages(*cloud.full_pages()))
    assert result.held_deletion is None
    assert result.details()["vms"] == {"archived": 1}
    assert normalize(await snapshot(engine)) == cloud.normalized()
    assert "held_deletion" not in (await runs(engine))[-1]["details"]


async def test_confirmed_deletion_is_applied_once(
    persister: Persister, engine: AsyncEngine
) -> None:
    cloud = fleet(20)
    await persister.save(MANAGER, pages(*cloud.full_pages()))
    for i in range(5, 20):
        cloud.remove_vm(f"v{i}")
    assert (await persister.save(MANAGER, pages(*cloud.full_pages()))).held_deletion

    await persister.confirm_deletions(MANAGER)
    assert (await manager_row(engine))["deletions_confirmed_at"] is not None
    result = await persister.save(MANAGER, pages(*cloud.full_pages()))
    assert result.held_deletion is None
    assert result.details()["vms"] == {"archived": 15}
    assert normalize(await snapshot(engine)) == cloud.normalized()

    # the confirmation was for one refresh: the next mass deletion is held again
    assert (await manager_row(engine))["deletions_confirmed_at"] is None
    assert (await persister.save(MANAGER, pages(InventoryPage()))).held_deletion


# -- the daemon: not retried, visible, confirmed through the API ----------------------------


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, str, SimulatedCloud]]:
    cloud = SimulatedCloud.generate(vms=20, seed=3, name="sim")
    async with SimulatorServer(cloud) as server:
        port = free_port()
        loaded = parse_config(
            {
                "database_url": f"sqlite:///{tmp_path / 'r.db'}",
                "batching": {"debounce": 0.01, "max_delay": 0.1, "retry_initial": 0.05},
                "http": {"listen": f"127.0.0.1:{port}", "token": {"value": TOKEN}},
                "managers": [
                    {"name": "sim", "provider": "awesome_cloud", "endpoint": server.url},
                ],
            }
        )
        d = Daemon(loaded)
        stop = asyncio.Event()
        task = asyncio.create_task(d.run(stop))
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_for(lambda: d.readiness.ready or task.done(), timeout=30, what="ready")
            assert not task.done(), task.exception() if task.done() else ""
            yield d, url, cloud
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 30) == 0


async def call(method: str, url: str, **kwargs: object) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def held_gauge(url: str) -> float | None:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "refreshd_deletions_held" and sample.labels["manager"] == "sim":
                return sample.value
    return None


async def test_daemon_holds_a_mass_deletion_without_retrying_and_applies_it_on_confirm(
    daemon: tuple[Daemon, str, SimulatedCloud],
) -> None:
    d, url, cloud = daemon
    auth = {"Authorization": f"Bearer {TOKEN}"}
    full = {"manager": "sim"}
    await wait_for(lambda: d.refreshes_ok >= 1, timeout=30, what="the start-up full refresh")
    for vm in cloud.ids("vms")[2:]:
        cloud.delete("vms", vm)  # 18 of 20 vms gone: well past max_delete_ratio
    kept = cloud.ids("vms")[0]
    cloud.update("vms", kept, {"name": "renamed-during-outage"})

    status, _ = await call("POST", url + "/refresh?wait=true", json=full, headers=auth)
    assert status == 200  # committed: the upserts are saved, the events acknowledged
    ok, failed = d.refreshes_ok, d.refreshes_failed
    assert failed == 0
    _, body = await call("GET", url + "/managers")
    (m,) = body["managers"]  # type: ignore[misc]
    assert m["deletions_held"]["rows"] > 18 and m["last_refresh_error"] is None
    assert await held_gauge(url) == m["deletions_held"]["rows"]

    # a targeted refresh flows, and nothing retries the held full refresh
    body_t = {"manager": "sim", "targets": [f"vms:{kept}"]}
    assert (await call("POST", url + "/refresh?wait=true", json=body_t, headers=auth))[0] == 200
    assert d.refreshes_ok == ok + 1 and d.refreshes_failed == 0
    assert d.batcher is not None and d.batcher.pending_count("sim") == 0

    bad = {"manager": "sim", "targets": [f"vms:{kept}"], "confirm_deletions": True}
    assert (await call("POST", url + "/refresh", json=bad, headers=auth))[0] == 400
    confirm = {"manager": "sim", "confirm_deletions": True}
    assert (await call("POST", url + "/refresh", json=confirm))[0] == 401
    status, _ = await call("POST", url + "/refresh?wait=true", json=confirm, headers=auth)
    assert status == 200
    _, body = await call("GET", url + "/managers")
    (m,) = body["managers"]  # type: ignore[misc]
    assert m["deletions_held"] is None
    assert await held_gauge(url) == 0
    assert (await row_counts(d))["vms"] == 2


async def row_counts(d: Daemon) -> dict[str, int]:
    engine = create_engine(d.config.database_url)
    try:
        persister = Persister(engine)
        await persister.ensure_manager("sim", "awesome_cloud")
        return await persister.row_counts("sim")
    finally:
        await engine.dispose()
