"""The AwesomeCloud simulator: its cloud model, HTTP API, event log and churn.

Everything runs against a real aiohttp server on 127.0.0.1 (a free port).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from random import Random
from typing import Any

import aiohttp
import pytest

from providers.awesome_cloud.simulator.cloud import (
    COLLECTIONS,
    BadRequestError,
    Cloud,
    ConflictError,
    NotFoundError,
)
from providers.awesome_cloud.simulator.server import SimulatorServer

VMS = 120


def fixed_clock() -> Iterator[datetime]:
    moment = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    while True:
        yield moment
        moment += timedelta(seconds=1)


def make_cloud(vms: int = VMS, seed: int = 7, **kwargs: Any) -> Cloud:
    ticks = fixed_clock()
    return Cloud.generate(vms=vms, seed=seed, clock=lambda: next(ticks), **kwargs)


@pytest.fixture
async def server() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(make_cloud()) as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as resp:
        data = await resp.json() if resp.status != 204 else None
        return resp.status, data


# -- the cloud model -----------------------------------------------------------------


def test_same_seed_gives_the_same_cloud() -> None:
    a, b, c = make_cloud(300, 5), make_cloud(300, 5), make_cloud(300, 6)
    assert a.snapshot() == b.snapshot()
    assert a.snapshot() != c.snapshot()


def test_generated_cloud_has_the_promised_shape() -> None:
    cloud = make_cloud(300, 5)
    assert cloud.count("vms") == 300
    assert cloud.count("images") == 300 // 50 + 5
    assert cloud.count("security_groups") == 300 // 100 + 5
    assert cloud.count("flavors") == 8
    assert cloud.ids("vms")[:2] == ["vm-000001", "vm-000002"]
    assert cloud.ids("flavors")[0] == "flavor-01"
    ports: set[str] = set()
    port_count = 0
    for vm_id in cloud.ids("vms"):
        vm = cloud.get("vms", vm_id)
        assert vm is not None
        assert 1 <= len(vm["disks"]) <= 3
        assert 1 <= len(vm["ports"]) <= 2
        assert 1 <= len(vm["security_group_ids"]) <= 2
        assert cloud.get("flavors", vm["flavor_id"]) is not None
        assert cloud.get("images", vm["image_id"]) is not None
        assert all(cloud.get("security_groups", g) for g in vm["security_group_ids"])
        assert vm["state"] in ("running", "stopped", "suspended")
        assert isinstance(vm["tags"], dict)
        ports.update(p["id"] for p in vm["ports"])
        port_count += len(vm["ports"])
    assert len(ports) == port_count  # port ids are unique


def test_python_api_errors() -> None:
    cloud = make_cloud(5)
    with pytest.raises(NotFoundError):
        cloud.update("vms", "vm-999999", {"state": "stopped"})
    with pytest.raises(ConflictError):
        cloud.create("vms", {"id": "vm-000001"})
    with pytest.raises(BadRequestError, match="colour"):
        cloud.create("vms", {"colour": "red"})
    with pytest.raises(BadRequestError, match="duplicate"):
        cloud.update("vms", "vm-000001", {"disks": [{"device_name": "a"}, {"device_name": "a"}]})
    with pytest.raises(NotFoundError, match="unknown collection"):
        cloud.get("routers", "r-1")
    assert cloud.last_sequence == 0  # refused mutations emit nothing


# -- read API --------------------------------------------------------------------------


@pytest.mark.parametrize("collection", COLLECTIONS)
async def test_paging_returns_every_object_exactly_once(
    server: SimulatorServer, http: aiohttp.ClientSession, collection: str
) -> None:
    seen: list[str] = []
    token: str | None = None
    while True:
        params = f"?limit=7&page_token={token}" if token else "?limit=7"
        status, page = await call(http, "GET", f"{server.url}/api/v1/{collection}{params}")
        assert status == 200
        assert len(page["items"]) <= 7
        seen += [item["id"] for item in page["items"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == server.cloud.ids(collection)
    assert seen == sorted(seen)
    assert server.stats.count(collection, "list") == -(-len(seen) // 7)


async def test_paging_is_stable_while_the_cloud_changes(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    cloud = server.cloud
    before = set(cloud.ids("vms"))
    seen: list[str] = []
    token = None
    deleted: set[str] = set()
    while True:
        url = f"{server.url}/api/v1/vms?limit=25" + (f"&page_token={token}" if token else "")
        _, page = await call(http, "GET", url)
        seen += [item["id"] for item in page["items"]]
        victim = cloud.ids("vms")[-1 - len(deleted)]  # delete ahead of the cursor
        cloud.delete("vms", victim)
        deleted.add(victim)
        cloud.create("vms", {"id": f"vm-000000-{len(deleted)}"})  # insert behind it
        token = page["next_page_token"]
        if token is None:
            break
    assert len(seen) == len(set(seen))
    assert before - deleted <= set(seen)


async def test_ids_filter_returns_only_known_ids(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    url = f"{server.url}/api/v1/vms?ids=vm-000003,vm-999999,vm-000001"
    status, page = await call(http, "GET", url)
    assert status == 200
    assert [i["id"] for i in page["items"]] == ["vm-000001", "vm-000003"]
    assert page["next_page_token"] is None
    assert page["items"][0] == server.cloud.get("vms", "vm-000001")
    assert server.stats.count("vms", "ids") == 1
    assert server.stats.count(kind="list") == 0


async def test_read_api_refuses_bad_requests(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    assert (await call(http, "GET", f"{server.url}/api/v1/vms?limit=0"))[0] == 400
    assert (await call(http, "GET", f"{server.url}/api/v1/vms?limit=x"))[0] == 400
    status, body = await call(http, "GET", f"{server.url}/api/v1/routers")
    assert status == 404
    assert "unknown collection" in body["error"]["message"]


async def test_bearer_token_guards_the_read_api(http: aiohttp.ClientSession) -> None:
    async with SimulatorServer(make_cloud(3), token="s3cret") as srv:
        assert (await call(http, "GET", f"{srv.url}/api/v1/vms"))[0] == 401
        async with http.get(
            f"{srv.url}/api/v1/vms", headers={"Authorization": "Bearer s3cret"}
        ) as resp:
            assert resp.status == 200


# -- admin API and events ------------------------------------------------------------------


async def test_admin_mutations_and_their_events(
    server: SimulatorServer, http: aiohttp.ClientSession
) -> None:
    received: list[dict[str, Any]] = []
    server.cloud.subscribe(received.append)
    admin = f"{server.url}/admin/v1"

    status, vm = await call(
        http,
        "POST",
        f"{admin}/vms",
        {
            "id": "vm-900000",
            "name": "new",
            "flavor_id": "flavor-02",
            "disks": [{"device_name": "/dev/vda", "size_gb": 10}],
            "ports": [{}],
        },
    )
    assert status == 201
    assert vm["ports"][0]["id"].startswith("port-") and vm["ports"][0]["mac"]
    assert (await call(http, "POST", f"{admin}/vms", {"id": "vm-900000"}))[0] == 409
    assert (await call(http, "POST", f"{admin}/vms", {"size": 1}))[0] == 400
    status, generated = await call(http, "POST", f"{admin}/images", {"name": "img", "os": "bsd"})
    assert status == 201 and generated["id"].startswith("image-")

    status, vm = await call(
        http,
        "PATCH",
        f"{admin}/vms/vm-900000",
        {
            "state": "stopped",
            "tags": {"env": "dev"},
            "security_group_ids": ["sg-01"],
            "disks": [
                {"device_name": "/dev/vda", "size_gb": 10},
                {"device_name": "/dev/vdb", "size_gb": 20},
            ],
        },
    )
    assert status == 200
    assert vm["state"] == "stopped" and len(vm["disks"]) == 2 and vm["name"] == "new"
    assert (await call(http, "PATCH", f"{admin}/vms/vm-nope", {"state": "x"}))[0] == 404
    assert (await call(http, "DELETE", f"{admin}/vms/vm-900000"))[0] == 204
    assert (await call(http, "DELETE", f"{admin}/vms/vm-900000"))[0] == 404
    assert server.cloud.get("vms", "vm-900000") is None

    status, log = await call(http, "GET", f"{admin}/events?after=0")
    assert status == 200
    events = log["events"]
    assert [(e["type"], e["subject"]) for e in events] == [
        ("com.awesomecloud.vm.created", "vm-900000"),
        ("com.awesomecloud.image.created", generated["id"]),
        ("com.awesomecloud.vm.updated", "vm-900000"),
        ("com.awesomecloud.vm.deleted", "vm-900000"),
    ]
    assert [e["sequence"] for e in events] == [1, 2, 3, 4]
    assert log["last"] == log["latest"] == 4 and not log["truncated"]
    assert events == received  # subscribers see the same events, in order
    assert len({e["id"] for e in events}) == 4
    for event in events:
        assert event["specversion"] == "1.0"
        assert event["source"] == server.cloud.name
        assert event["datacontenttype"] == "application/json"
        datetime.fromisoformat(event["time"])
    assert events[0]["time"].endswith("Z")
    assert events[2]["data"]["state"] == "stopped"
    assert events[3]["data"] == {"id": "vm-900000"}

    _, tail = await call(http, "GET", f"{admin}/events?after=2&limit=1")
    assert [e["sequence"] for e in tail["events"]] == [3] and tail["last"] == 3


def test_events_are_immutable_snapshots() -> None:
    cloud = make_cloud(3)
    cloud.update("vms", "vm-000001", {"state": "stopped"})
    cloud.update("vms", "vm-000001", {"state": "running"})
    first, second = cloud.events_after(0).events
    assert first["data"]["state"] == "stopped" and second["data"]["state"] == "running"


def test_event_log_is_bounded_and_says_when_it_lost_events() -> None:
    cloud = make_cloud(3, max_events=10)
    for i in range(40):
        cloud.update("vms", "vm-000001", {"name": f"n{i}"})
    page = cloud.events_after(0, limit=100)
    assert page.truncated
    assert 10 <= len(page.events) <= 20
    assert page.events[-1]["sequence"] == page.latest == page.last == 40
    assert not cloud.events_after(35).truncated
    assert cloud.events_after(40).events == [] and cloud.events_after(40).last == 40


def test_a_failing_subscriber_does_not_stop_the_mutation() -> None:
    cloud = make_cloud(3)
    got: list[str] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    cloud.subscribe(broken)
    unsubscribe = cloud.subscribe(lambda e: got.append(e["type"]))
    cloud.delete("vms", "vm-000002")
    unsubscribe()
    cloud.delete("vms", "vm-000003")
    assert got == ["com.awesomecloud.vm.deleted"]
    assert cloud.last_sequence == 2


def test_churn_mutates_through_the_event_path_deterministically() -> None:
    a, b = make_cloud(60, 3, instance_id="x"), make_cloud(60, 3, instance_id="x")
    seen: list[dict[str, Any]] = []
    a.subscribe(seen.append)
    events = a.churn(Random(11), 200)
    assert len(events) == 200 == a.last_sequence
    assert events == seen
    assert b.churn(Random(11), 200) == events
    assert a.snapshot() == b.snapshot()
    kinds = {e["type"] for e in events}
    assert {
        "com.awesomecloud.vm.created",
        "com.awesomecloud.vm.deleted",
        "com.awesomecloud.vm.updated",
    } <= kinds
    assert any(t.startswith("com.awesomecloud.image.") for t in kinds)
    for event in events:  # every event describes the object as it was then, or its deletion
        kind, action = event["type"].split(".")[2:]
        assert event["subject"] == event["data"]["id"]
        assert action in ("created", "updated", "deleted")
        assert kind in ("vm", "image", "flavor", "security_group")


def test_churn_on_an_empty_cloud_creates() -> None:
    cloud = Cloud(name="empty")
    events = cloud.churn(Random(1), 20)
    assert len(events) == 20
    assert cloud.count("vms") + cloud.count("images") > 0


# -- faults ------------------------------------------------------------------------------


async def test_fault_admin_api(server: SimulatorServer, http: aiohttp.ClientSession) -> None:
    faults = f"{server.url}/admin/v1/faults"
    assert (await call(http, "POST", faults, {"error_rate": 2}))[0] == 400
    assert (await call(http, "POST", faults, {"bogus": 1}))[0] == 400
    status, plan = await call(
        http, "POST", faults, {"error_rate": 1, "status": 503, "retry_after": 2, "count": 2}
    )
    assert status == 200 and plan["count"] == 2
    for _ in range(2):
        async with http.get(f"{server.url}/api/v1/flavors") as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "2"
    async with http.get(f"{server.url}/api/v1/flavors") as resp:
        assert resp.status == 200  # the count is used up
    assert (await call(http, "GET", f"{server.url}/admin/v1/events"))[0] == 200  # admin: no faults
    await call(http, "POST", faults, {"error_rate": 1, "status": 500})
    assert (await call(http, "DELETE", faults))[0] == 204
    assert (await call(http, "GET", faults)) == (200, None)
    async with http.get(f"{server.url}/api/v1/flavors") as resp:
        assert resp.status == 200
    _, stats = await call(http, "GET", f"{server.url}/admin/v1/stats")
    assert stats["requests"]["flavors"]["list"] == 4


async def test_churn_admin_api_starts_stops_and_reports(http: aiohttp.ClientSession) -> None:
    import asyncio

    from providers.awesome_cloud.simulator.server import churn_controlled

    cloud = make_cloud(30)
    async with SimulatorServer(cloud) as server:
        task = asyncio.create_task(churn_controlled(cloud, server.churn, seed=5))
        churn = f"{server.url}/admin/v1/churn"
        try:
            assert (await call(http, "POST", churn, {"per_second": -1}))[0] == 400
            assert (await call(http, "POST", churn, {"rate": 1}))[0] == 400
            status, state = await call(http, "GET", churn)
            assert status == 200
            assert state == {"per_second": 0, "mutations": 0, "last_sequence": 0, "delivered": []}
            status, state = await call(http, "POST", churn, {"per_second": 200})
            assert status == 200 and state["per_second"] == 200
            for _ in range(200):  # a condition with a bound, not a fixed delay
                if cloud.last_sequence >= 20:
                    break
                await asyncio.sleep(0.02)
            assert cloud.last_sequence >= 20
            _, state = await call(http, "POST", churn, {"per_second": 0})
            stopped_at = state["last_sequence"]
            assert state["mutations"] == stopped_at  # one event per mutation
            await asyncio.sleep(0.2)  # four ticks at the old rate: nothing may happen
            _, state = await call(http, "GET", churn)
            assert state["last_sequence"] == stopped_at == cloud.last_sequence
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
