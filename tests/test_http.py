"""The daemon's HTTP endpoint, on a real daemon in this process (SQLite, embedded cloud)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.service.config import parse_config
from daemon.service.lifecycle import Daemon
from tests.daemon_process import free_port, wait_for

TOKEN = "t0ken"


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, str]]:
    port = free_port()
    loaded = parse_config(
        {
            "database_url": f"sqlite:///{tmp_path / 'r.db'}",
            "instance_name": "test-instance",
            "batching": {"debounce": 0.01, "max_delay": 0.1},
            "http": {"listen": f"127.0.0.1:{port}", "token": {"value": TOKEN}},
            "managers": [
                {
                    "name": "awesome",
                    "provider": "awesome_cloud",
                    "endpoint": "embedded",
                    "embedded_vms": 10,
                },
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
        yield d, url
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


async def call(method: str, url: str, **kwargs: object) -> tuple[int, dict[str, object], str]:
    async with aiohttp.ClientSession() as s, s.request(method, url, **kwargs) as resp:
        text = await resp.text()
        body = await resp.json(content_type=None) if text.startswith("{") else {}
        return resp.status, body, text


async def test_health_readiness_and_managers(daemon: tuple[Daemon, str]) -> None:
    d, url = daemon
    assert (await call("GET", url + "/healthz"))[0] == 200
    assert (await call("GET", url + "/readyz"))[0] == 200

    # the scheduler's start-up full refresh shows on /managers
    async def refreshed() -> bool:
        _, body, _ = await call("GET", url + "/managers")
        managers = body["managers"]
        assert isinstance(managers, list)
        return managers[0]["last_full_refresh_at"] is not None

    await wait_for(refreshed, timeout=30, what="the start-up full refresh")
    _, body, _ = await call("GET", url + "/managers")
    (m,) = body["managers"]
    assert m["name"] == "awesome" and m["provider"] == "awesome_cloud"
    assert m["pending_targets"] == 0 and m["last_refresh_error"] is None
    # on SQLite the one process owns every manager, under its instance name
    assert m["owner"] == "test-instance" and m["owned_here"] is True and m["owner_since"]

    # while stopping, readiness goes 503 with the reason
    d.readiness.reasons.add("stopping")
    status, body, _ = await call("GET", url + "/readyz")
    assert status == 503 and body["reasons"] == ["stopping"]
    d.readiness.reasons.discard("stopping")


async def test_manual_refresh_is_authenticated_and_committed(
    daemon: tuple[Daemon, str],
) -> None:
    _, url = daemon
    body = {"manager": "awesome", "targets": ["vms:vm-000001"]}
    assert (await call("POST", url + "/refresh", json=body))[0] == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await call("POST", url + "/refresh", json=body, headers=wrong))[0] == 401

    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, reply, _ = await call(
        "POST", url + "/refresh", json={"manager": "nobody"}, headers=auth
    )
    assert status == 400 and "unknown manager" in str(reply["error"])
    status, reply, _ = await call("POST", url + "/refresh", data=b"{not json", headers=auth)
    assert status == 400

    status, reply, _ = await call("POST", url + "/refresh", json=body, headers=auth)
    assert status == 202 and reply == {"status": "queued", "targets": 1}
    status, reply, _ = await call("POST", url + "/refresh?wait=true", json=body, headers=auth)
    assert status == 200 and reply["status"] == "committed"

    # a manual full refresh, waited for
    status, reply, _ = await call(
        "POST", url + "/refresh?wait=true", json={"manager": "awesome"}, headers=auth
    )
    assert status == 200


async def test_manual_refresh_refuses_a_target_of_an_unknown_collection(
    daemon: tuple[Daemon, str],
) -> None:
    """``vm:x`` names no declared collection: 400 naming it, nothing queued (the same parser
    as ``refreshd refresh --target``)."""
    d, url = daemon
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = d.batcher.pending_count() if d.batcher else 0
    for spec, message in [
        ("vm:x", "target 'vm:x': unknown collection 'vm' (flavors, images, "),
        ("vms", "target 'vms': expected COLLECTION:REF"),
        ("disks:vm=vm-1,sda", "target 'disks:vm=vm-1,sda': expected key=value pairs"),
    ]:
        body = {"manager": "awesome", "targets": ["vms:vm-000001", spec]}
        status, reply, _ = await call("POST", url + "/refresh?wait=true", json=body, headers=auth)
        assert status == 400, (spec, reply)
        assert str(reply["error"]).startswith(f"bad request: {message}"), reply
    assert d.batcher is not None and d.batcher.pending_count() == before


async def test_metrics_count_refreshes_and_rows(daemon: tuple[Daemon, str]) -> None:
    d, url = daemon
    auth = {"Authorization": f"Bearer {TOKEN}"}
    await call("POST", url + "/refresh?wait=true", json={"manager": "awesome"}, headers=auth)
    _, _, text = await call("GET", url + "/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    full_ok = samples[
        (
            "refreshd_refreshes_total",
            (("kind", "full"), ("manager", "awesome"), ("outcome", "success")),
        )
    ]
    assert full_ok >= 1
    created_vms = samples[
        (
            "refreshd_rows_written_total",
            (("action", "created"), ("collection", "vms"), ("manager", "awesome")),
        )
    ]
    assert created_vms == 10
    assert ("refreshd_pending_targets", (("manager", "awesome"),)) in samples
    assert any(name == "refreshd_refresh_duration_seconds_count" for name, _ in samples)
    assert d.status_line().startswith("events in 0, targets pending 0, refreshes done")
