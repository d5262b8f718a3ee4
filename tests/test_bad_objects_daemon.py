"""Poison values through the whole daemon (simulator -> collector -> parser -> persister),
on SQLite and PostgreSQL: 100 ordinary changes land while a handful of objects carry
values that used to stop the manager (issue 14 item 1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text

from daemon.persistence import schema
from daemon.persistence.db import create_engine
from daemon.service.config import parse_config
from daemon.service.lifecycle import Daemon
from providers.awesome_cloud.simulator.cloud import Cloud
from providers.awesome_cloud.simulator.server import SimulatorServer
from tests.daemon_process import free_port, wait_for

TOKEN = "t0ken"
R = "\ufffd"


@pytest.fixture
async def daemon(empty_db_url: str) -> AsyncIterator[tuple[Daemon, str, Cloud]]:
    cloud = Cloud.generate(vms=120, seed=5, name="sim")
    async with SimulatorServer(cloud) as server:
        port = free_port()
        loaded = parse_config(
            {
                "database_url": empty_db_url,
                "batching": {"debounce": 0.01, "max_delay": 0.1, "retry_initial": 0.05},
                "http": {"listen": f"127.0.0.1:{port}", "token": {"value": TOKEN}},
                "managers": [{"name": "sim", "provider": "awesome_cloud", "endpoint": server.url}],
            }
        )
        d = Daemon(loaded)
        stop = asyncio.Event()
        task = asyncio.create_task(d.run(stop))
        try:
            await wait_for(lambda: d.readiness.ready or task.done(), timeout=30, what="ready")
            assert not task.done(), task.exception() if task.done() else ""
            await wait_for(lambda: d.refreshes_ok >= 1, timeout=60, what="the first full refresh")
            yield d, f"http://127.0.0.1:{port}", cloud
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 30) == 0


async def vms_in(url: str) -> dict[str, dict[str, Any]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(schema.vms))).mappings().all()
            return {r["ems_ref"]: dict(r) for r in rows}
    finally:
        await engine.dispose()


async def test_poison_values_from_the_cloud_do_not_stop_100_changes(
    daemon: tuple[Daemon, str, Cloud], empty_db_url: str
) -> None:
    d, url, cloud = daemon
    changed = cloud.ids("vms")[:100]
    for vm_id in changed:
        cloud.update("vms", vm_id, {"name": f"{vm_id}-changed"})
    poison = {
        "vm-long-name": {"name": "n" * 300},
        "i" * 300: {},
        "vm-long-state": {"state": "s" * 70},
        "vm-nul\x00id": {},
        "vm-nul-name": {"name": "a\x00b", "tags": {"k\x00": "v\x00"}},
        "vm-surrogate": {"name": "x\ud800y"},
        "vm-huge-disk": {"disks": [{"device_name": "sda", "size_gb": 2**40}]},
    }
    for vm_id, fields in poison.items():
        cloud.create("vms", {"id": vm_id, **fields})
    body = {"manager": "sim", "targets": [f"vms:{v}" for v in [*changed, *poison]]}
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/refresh?wait=true", json=body, headers=auth) as resp,
    ):
        assert resp.status == 200, await resp.text()

    vms = await vms_in(empty_db_url)
    assert all(vms[v]["name"] == f"{v}-changed" for v in changed)
    assert vms["vm-long-name"]["name"] == "n" * 300
    assert vms["i" * 300]["archived_at"] is None
    assert vms["vm-long-state"]["state"] == "s" * 70
    assert f"vm-nul{R}id" in vms
    assert vms["vm-nul-name"]["name"] == f"a{R}b"
    assert vms["vm-nul-name"]["tags"] == {f"k{R}": f"v{R}"}
    assert vms["vm-surrogate"]["name"] == f"x{R}y"
    assert vms["vm-huge-disk"]["archived_at"] is None  # the vm saved; its disk did not
    assert d.refreshes_failed == 0

    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        text = await resp.text()
    rejected = {
        (x.labels["collection"], x.labels["reason"]): x.value
        for f in text_string_to_metric_families(text)
        for x in f.samples
        if x.name == "refreshd_objects_rejected_total"
    }
    assert rejected == {("disks", "out_of_range"): 1.0}


async def test_a_row_the_database_refuses_in_a_full_refresh_is_isolated_by_its_retry(
    daemon: tuple[Daemon, str, Cloud], empty_db_url: str
) -> None:
    d, url, cloud = daemon
    engine = create_engine(empty_db_url)
    postgres = engine.dialect.name == "postgresql"
    refused = "CHECK (name <> 'refused')"
    async with engine.begin() as conn:  # what the row check cannot foresee
        await conn.execute(
            text(f"ALTER TABLE vms ADD CONSTRAINT test_refused {refused}")
            if postgres
            else text(
                "CREATE TRIGGER test_refused BEFORE UPDATE ON vms WHEN NEW.name = 'refused' "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        )
    try:
        victim, other = cloud.ids("vms")[:2]
        cloud.update("vms", victim, {"name": "refused"})
        cloud.update("vms", other, {"name": "saved"})
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with (
            aiohttp.ClientSession() as s,
            s.post(url + "/refresh?wait=true", json={"manager": "sim"}, headers=auth) as resp,
        ):
            assert resp.status == 200, await resp.text()
        vms = await vms_in(empty_db_url)
        assert vms[other]["name"] == "saved"
        assert vms[victim]["name"] != "refused" and vms[victim]["archived_at"] is None
        assert d.refreshes_failed == 1  # the streamed attempt; its retry isolated the row
        async with engine.connect() as conn:
            listed = (await conn.execute(select(schema.rejected_objects))).mappings().all()
        assert [(r["collection"], r["ref"], r["reason"]) for r in listed] == [
            ("vms", victim, "database_error")
        ]
    finally:
        async with engine.begin() as conn:
            await conn.execute(
                text("ALTER TABLE vms DROP CONSTRAINT test_refused")
                if postgres
                else text("DROP TRIGGER test_refused")
            )
        await engine.dispose()
