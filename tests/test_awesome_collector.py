"""The AwesomeCloud collector and parser: full and targeted refreshes against the simulator."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from daemon.model.inventory import COLLECTIONS, InventoryPage
from daemon.model.provider import ManagerConnection, ProviderAuthError, load_provider
from daemon.model.targets import Target, TargetCollection
from providers.awesome_cloud import AwesomeCloudSettings, AwesomeConnection, provider
from providers.awesome_cloud.parser import parse_page, parse_vms
from providers.awesome_cloud.simulator.app import FaultPlan
from providers.awesome_cloud.simulator.cloud import Cloud
from providers.awesome_cloud.simulator.server import SimulatorServer

VMS = 230
REFERENCED = ("flavors", "images", "security_groups")


@pytest.fixture
async def conn() -> AsyncIterator[AwesomeConnection]:
    settings = AwesomeCloudSettings(endpoint="embedded", embedded_vms=VMS, page_size=50)
    async with provider.connect("m1", settings) as connection:
        yield connection


def cloud_of(conn: AwesomeConnection) -> Cloud:
    assert conn.cloud is not None
    return conn.cloud


def stats_of(conn: AwesomeConnection) -> Any:
    assert conn.simulator is not None
    return conn.simulator.stats


async def collect(pages: AsyncIterator[InventoryPage]) -> list[InventoryPage]:
    return [page async for page in pages]


def rows(pages: list[InventoryPage], collection: str) -> list[dict[str, Any]]:
    return [row for page in pages for row in page.rows.get(collection, [])]


def qualname(task: asyncio.Task[Any]) -> str:
    return str(getattr(task.get_coro(), "__qualname__", ""))


def vm_targets(*refs: str, extra: tuple[Target, ...] = ()) -> TargetCollection:
    return TargetCollection("m1", [*(Target.of("m1", "vms", r) for r in refs), *extra])


def test_provider_is_registered_and_fits_the_protocol() -> None:
    assert load_provider("awesome_cloud") is provider
    assert provider.settings_model is AwesomeCloudSettings
    connection = provider.connect("m1", AwesomeCloudSettings(endpoint="http://cloud.example"))
    assert isinstance(connection, ManagerConnection)
    assert connection.endpoint == "http://cloud.example" and connection.cloud is None


def test_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        AwesomeCloudSettings(endpoint="ftp://x")
    with pytest.raises(ValueError, match="extra"):
        AwesomeCloudSettings.model_validate({"endpoint": "embedded", "page_sise": 10})
    with pytest.raises(ValueError):
        AwesomeCloudSettings(endpoint="embedded", page_size=6000)
    with pytest.raises(ValueError, match="backoff_max"):
        AwesomeCloudSettings(endpoint="embedded", backoff_initial=5, backoff_max=1)
    assert AwesomeCloudSettings(endpoint="https://x/api/").endpoint == "https://x/api"


async def test_full_refresh_yields_every_object_once_in_dependency_order(
    conn: AwesomeConnection,
) -> None:
    cloud = cloud_of(conn)
    assert conn.endpoint.startswith("http://127.0.0.1:")
    pages = await collect(conn.collect_full())

    first_vm_page = next(i for i, p in enumerate(pages) if "vms" in p.rows)
    assert all("vms" not in p.rows for p in pages[:first_vm_page])
    assert all(set(p.rows) == {"vms", *parse_vms([]).rows} for p in pages[first_vm_page:])
    assert all(len(p.rows["vms"]) <= 50 for p in pages[first_vm_page:])

    for collection in (*REFERENCED, "vms"):
        refs = [r["ems_ref"] for r in rows(pages, collection)]
        assert refs == cloud.ids(collection), collection
    vms = [cloud.get("vms", v) for v in cloud.ids("vms")]
    assert len(rows(pages, "disks")) == sum(len(vm["disks"]) for vm in vms if vm)
    assert len(rows(pages, "network_ports")) == sum(len(vm["ports"]) for vm in vms if vm)
    assert len(rows(pages, "vm_security_groups")) == sum(
        len(vm["security_group_ids"]) for vm in vms if vm
    )
    for collection in COLLECTIONS.collections:
        for row in rows(pages, collection):
            assert set(row) == set(COLLECTIONS[collection].staged_attributes), collection

    stats = stats_of(conn)
    assert stats.count("vms", "list") == -(-VMS // 50)
    assert stats.count(kind="ids") == 0


async def test_rows_carry_the_cloud_objects(conn: AwesomeConnection) -> None:
    cloud = cloud_of(conn)
    vm = cloud.get("vms", "vm-000007")
    assert vm is not None
    pages = await collect(conn.collect_targeted(vm_targets("vm-000007")))
    (row,) = rows(pages, "vms")
    assert row == {
        "ems_ref": "vm-000007",
        "name": vm["name"],
        "state": vm["state"],
        "flavor": vm["flavor_id"],
        "image": vm["image_id"],
        "tags": vm["tags"],
        "extra": {"zone": vm["zone"], "created_at": vm["created_at"]},
    }
    assert rows(pages, "disks") == [
        {"vm": "vm-000007", "device_name": d["device_name"], "size_gb": d["size_gb"], "extra": None}
        for d in vm["disks"]
    ]
    assert rows(pages, "network_ports") == [
        {
            "vm": "vm-000007",
            "ems_ref": p["id"],
            "mac_address": p["mac"],
            "ip_address": p["ip"],
            "extra": None,
        }
        for p in vm["ports"]
    ]
    flavor = cloud.get("flavors", vm["flavor_id"])
    assert flavor is not None
    assert rows(pages, "flavors") == [
        {
            "ems_ref": flavor["id"],
            "name": flavor["name"],
            "cpus": flavor["cpus"],
            "memory_mb": flavor["memory_mb"],
            "extra": {"disk_gb": flavor["disk_gb"], "created_at": flavor["created_at"]},
        }
    ]


async def test_targeted_refresh_fetches_only_targets_and_their_references(
    conn: AwesomeConnection,
) -> None:
    cloud = cloud_of(conn)
    stats = stats_of(conn)
    cloud.delete("vms", "vm-000009")
    lonely_image = cloud.create("images", {"name": "lonely"})["id"]
    targets = vm_targets(
        "vm-000003",
        "vm-000004",
        "vm-000150",
        "vm-000009",
        "vm-999999",
        extra=(
            Target.of("m1", "images", lonely_image),
            Target.of("m1", "disks", "whatever"),
            Target.of("m1", "routers", "r-1"),
        ),
    )
    pages = await collect(conn.collect_targeted(targets))

    vms = [cloud.get("vms", v) for v in ("vm-000003", "vm-000004", "vm-000150")]
    assert sorted(r["ems_ref"] for r in rows(pages, "vms")) == [
        "vm-000003",
        "vm-000004",
        "vm-000150",
    ]
    assert {r["ems_ref"] for r in rows(pages, "flavors")} == {vm["flavor_id"] for vm in vms if vm}
    assert {r["ems_ref"] for r in rows(pages, "images")} == {vm["image_id"] for vm in vms if vm} | {
        lonely_image
    }
    assert {r["ems_ref"] for r in rows(pages, "security_groups")} == {
        g for vm in vms if vm for g in vm["security_group_ids"]
    }
    assert {r["vm"] for r in rows(pages, "disks")} == {"vm-000003", "vm-000004", "vm-000150"}

    first_vm_page = next(i for i, p in enumerate(pages) if "vms" in p.rows)
    assert all(set(p.rows) <= set(REFERENCED) for p in pages[:first_vm_page])
    assert all("vms" in p.rows for p in pages[first_vm_page:])
    assert stats.count(kind="list") == 0  # never lists a collection
    assert stats.count("vms", "ids") == 1


async def test_targeted_refresh_asks_ids_per_request_at_a_time() -> None:
    settings = AwesomeCloudSettings(endpoint="embedded", embedded_vms=20, ids_per_request=2)
    async with provider.connect("m1", settings) as conn:
        refs = [f"vm-{i:06d}" for i in range(1, 6)]
        pages = await collect(conn.collect_targeted(vm_targets(*refs)))
        assert [r["ems_ref"] for r in rows(pages, "vms")] == refs
        assert stats_of(conn).count("vms", "ids") == 3


async def test_a_deleted_reference_is_absent_but_still_referred_to(
    conn: AwesomeConnection,
) -> None:
    cloud = cloud_of(conn)
    vm = cloud.get("vms", "vm-000011")
    assert vm is not None
    cloud.delete("flavors", vm["flavor_id"])
    pages = await collect(conn.collect_targeted(vm_targets("vm-000011")))
    assert rows(pages, "flavors") == []
    assert rows(pages, "vms")[0]["flavor"] == vm["flavor_id"]  # the persister makes it skeletal


async def test_targets_that_need_nothing_fetch_nothing(conn: AwesomeConnection) -> None:
    targets = TargetCollection("m1", [Target.of("m1", "network_ports", "port-000001")])
    assert await collect(conn.collect_targeted(targets)) == []
    assert stats_of(conn).count() == 0


async def test_a_full_target_collection_means_a_full_refresh(conn: AwesomeConnection) -> None:
    pages = await collect(conn.collect_targeted(TargetCollection("m1", [Target.full("m1")])))
    assert len(rows(pages, "vms")) == VMS


async def test_closing_a_full_refresh_early_stops_the_prefetch(conn: AwesomeConnection) -> None:
    def prefetching() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if qualname(t) == "prefetch.<locals>.step"]

    pages = conn.collect_full()
    first = await anext(pages)
    assert "flavors" in first.rows
    assert len(prefetching()) == 1  # the next page is on its way
    await pages.aclose()
    assert prefetching() == []
    assert stats_of(conn).count() <= 2  # the page consumed and at most one ahead


async def test_cancelling_the_consumer_cancels_the_fetch_in_flight(
    conn: AwesomeConnection,
) -> None:
    assert conn.simulator is not None
    pages = conn.collect_full()
    await anext(pages)
    conn.simulator.faults.set(FaultPlan(latency_ms=200))
    waiter = asyncio.ensure_future(anext(pages))
    await asyncio.sleep(0)  # let it start waiting for the page in flight
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await pages.aclose()
    assert not [t for t in asyncio.all_tasks() if qualname(t) == "prefetch.<locals>.step"]


async def test_a_failing_page_surfaces_to_the_consumer(conn: AwesomeConnection) -> None:
    assert conn.simulator is not None
    conn.simulator.faults.set(FaultPlan(error_rate=1, status=403))
    with pytest.raises(ProviderAuthError, match="403"):
        await collect(conn.collect_full())


async def test_an_embedded_endpoint_can_require_a_token() -> None:
    settings = AwesomeCloudSettings(endpoint="embedded", embedded_vms=5, token="t0k")
    async with provider.connect("m1", settings) as conn:
        pages = await collect(conn.collect_full())
        assert len(rows(pages, "vms")) == 5
        async with aiohttp.ClientSession() as http, http.get(conn.endpoint + "/api/v1/vms") as resp:
            assert resp.status == 401


async def test_a_remote_endpoint_has_no_cloud() -> None:
    async with SimulatorServer(Cloud.generate(vms=12, seed=3)) as server:
        settings = AwesomeCloudSettings(endpoint=server.url, page_size=5)
        async with provider.connect("remote", settings) as conn:
            assert conn.cloud is None and conn.simulator is None
            assert conn.endpoint == server.url
            pages = await collect(conn.collect_full())
    assert [r["ems_ref"] for r in rows(pages, "vms")] == server.cloud.ids("vms")


# -- parser ------------------------------------------------------------------------------


def test_parser_keeps_extras_and_drops_what_cannot_be_saved() -> None:
    vm = {
        "id": "vm-1",
        "name": "",
        "state": "running",
        "flavor_id": "",
        "image_id": None,
        "tags": {"a": "b"},
        "security_group_ids": ["sg-1", "sg-1", 7, "sg-2"],
        "disks": [
            {"device_name": "/dev/vda", "size_gb": "20", "type": "ssd"},
            {"device_name": "/dev/vda", "size_gb": 5},
            {"size_gb": 1},
        ],
        "ports": [{"id": "p-1", "mac": "m", "ip": "i"}, {"id": "p-1"}, "junk"],
        "zone": "az-1",
    }
    page = parse_vms([vm, {"name": "no id"}, vm])
    assert page.rows["vms"] == [
        {
            "ems_ref": "vm-1",
            "name": "",
            "state": "running",
            "flavor": None,
            "image": None,
            "tags": {"a": "b"},
            "extra": {"zone": "az-1"},
        }
    ]
    assert page.rows["disks"] == [
        {"vm": "vm-1", "device_name": "/dev/vda", "size_gb": 20, "extra": {"type": "ssd"}}
    ]
    assert [p["ems_ref"] for p in page.rows["network_ports"]] == ["p-1"]
    assert Counter(r["security_group"] for r in page.rows["vm_security_groups"]) == {
        "sg-1": 1,
        "sg-2": 1,
    }
    image = parse_page("images", [{"id": "image-1", "name": "x", "os": "linux"}])
    assert image.rows == {
        "images": [{"ems_ref": "image-1", "name": "x", "os": "linux", "extra": None}]
    }
