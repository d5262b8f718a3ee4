"""Several `refreshd run` processes on one PostgreSQL database and one Kafka consumer group.

The harness of tests/test_scaleout.py and bench/scaleout.py: one AwesomeCloud
simulator per manager (the fake clouds, in this process), optionally a slowed
twin server of each cloud for chosen processes, one topic with several
partitions that every cloud's events go to keyed by manager name, and N
daemon subprocesses with the same configuration apart from their HTTP port and
``instance_name`` (``p0``, ``p1``, ...).  What is observed is what an operator
sees: rows and ``refresh_runs`` in PostgreSQL, ``/managers``, logs.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.persistence import schema
from daemon.persistence.db import create_engine
from daemon.pipeline.postgres_ownership import current_owners
from providers.awesome_cloud.simulator.cloud import Cloud
from providers.awesome_cloud.simulator.delivery import Delivery, KafkaTransport
from providers.awesome_cloud.simulator.server import SimulatorServer, churn_forever
from tests.cloud_state import cloud_state, database_state, diff_states
from tests.daemon_process import DaemonProcess, free_port, wait_for, write_config

CATCHER_OPTIONS: dict[str, Any] = {
    "session_timeout": "3s",  # Tansu keeps a killed member until its session expires
    "heartbeat_interval": "500ms",
    "rebalance_timeout": "1s",
    "commit_timeout": "500ms",
    "commit_interval": "200ms",
    "poll_timeout": "100ms",
    "drain_timeout": "5s",
}
OWNERSHIP = {
    "keepalive": "500ms",
    "session_timeout": "5s",
    "release_after": "1s",
    "save_idle_timeout": "5s",
}


@dataclass
class Cluster:
    pg_url: str
    engine: AsyncEngine
    clouds: dict[str, Cloud]
    servers: dict[str, SimulatorServer]
    slow_servers: dict[str, SimulatorServer]
    daemons: list[DaemonProcess]
    deliveries: list[Delivery] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    topic: str | None = None

    @property
    def managers(self) -> list[str]:
        return sorted(self.clouds)

    # processes

    async def start(self, *indexes: int) -> None:
        """Start these processes (all when none given) at once, then wait until each is ready."""
        chosen = list(indexes) or list(range(len(self.daemons)))
        for i in chosen:
            self.daemons[i].start()
        await asyncio.gather(*(self.daemons[i].wait_ready(timeout=60) for i in chosen))

    async def kill(self, i: int) -> None:
        self.daemons[i].signal(signal.SIGKILL)
        await wait_for(lambda: not self.daemons[i].alive(), timeout=10, what=f"p{i} killed")

    async def terminate(self, i: int, timeout: float = 60) -> int:
        d = self.daemons[i]
        d.signal(signal.SIGTERM)
        await wait_for(lambda: not d.alive(), timeout=timeout, what=f"p{i} exits on SIGTERM")
        assert d.proc is not None
        return d.proc.returncode

    def logs(self) -> str:
        return "\n".join(d.log() for d in self.daemons)

    def count_in_logs(self, needle: str) -> int:
        return sum(d.log().count(needle) for d in self.daemons)

    async def managers_view(self, i: int) -> dict[str, dict[str, Any]]:
        status, body = await self.daemons[i].get("/managers")
        assert status == 200, body
        return {m["name"]: m for m in json.loads(body)["managers"]}

    async def post_refresh(
        self, i: int, manager: str, targets: Iterable[str] = (), *, wait: bool = False
    ) -> int:
        url = self.daemons[i].url + "/refresh" + ("?wait=true" if wait else "")
        body = {"manager": manager, "targets": list(targets)}
        async with aiohttp.ClientSession() as s, s.post(url, json=body) as resp:
            return resp.status

    # database

    async def owners(self) -> dict[str, str]:
        """manager -> instance holding it now (from the locks, not from the daemons)."""
        async with self.engine.connect() as conn:
            return {name: owner.instance for name, owner in (await current_owners(conn)).items()}

    async def runs(self, manager: str, kind: str | None = None) -> list[Any]:
        r, m = schema.refresh_runs, schema.managers
        q = (
            select(r.c.kind, r.c.error, r.c.started_at, r.c.duration)
            .join(m, m.c.id == r.c.manager_id)
            .where(m.c.name == manager)
            .order_by(r.c.id)
        )
        if kind is not None:
            q = q.where(r.c.kind == kind)
        async with self.engine.connect() as conn:
            return list(await conn.execute(q))

    async def full_refreshes(self, manager: str) -> int:
        return sum(1 for run in await self.runs(manager, "full") if run.error is None)

    async def converged(self) -> bool:
        for name, cloud in self.clouds.items():
            if diff_states(await database_state(self.engine, name), cloud_state(cloud)):
                return False
        return True

    # cloud -> topic

    def churn(self, per_second: float, seed: int = 7) -> list[asyncio.Task[None]]:
        started = [
            asyncio.create_task(churn_forever(cloud, per_second=per_second, seed=seed + i))
            for i, cloud in enumerate(self.clouds.values())
        ]
        self.tasks += started
        return started

    async def delivered(self) -> None:
        await wait_for(
            lambda: all(d.stats.cursor == d.cloud.last_sequence for d in self.deliveries),
            timeout=30,
            what="the deliveries to catch up with the clouds",
        )

    async def close(self) -> None:
        for d in self.daemons:
            if d.alive():
                d.signal(signal.SIGKILL)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for d in self.daemons:
            if d.proc is not None:
                await asyncio.to_thread(d.proc.wait, 10)
        for server in [*self.servers.values(), *self.slow_servers.values()]:
            await server.stop()
        await self.engine.dispose()


async def make_cluster(
    tmp_path: Path,
    pg_url: str,
    *,
    processes: int = 3,
    managers: int = 2,
    vms: int = 100,
    kafka: tuple[str, str, str] | None = None,
    slow: Iterable[int] = (),
    manager_options: dict[str, Any] | None = None,
    batching: dict[str, Any] | None = None,
) -> Cluster:
    """A cluster (processes not started); ``kafka`` is (bootstrap, topic, group) or None."""
    slow = set(slow)
    clouds = {f"m{i}": Cloud.generate(vms=vms, seed=i + 1, name=f"m{i}") for i in range(managers)}
    servers = {name: SimulatorServer(cloud) for name, cloud in clouds.items()}
    slow_servers = {name: SimulatorServer(cloud) for name, cloud in clouds.items()} if slow else {}
    for server in [*servers.values(), *slow_servers.values()]:
        await server.start()
    daemons = []
    for i in range(processes):
        port = free_port()
        endpoints = slow_servers if i in slow else servers
        config: dict[str, Any] = {
            "database_url": pg_url,
            "instance_name": f"p{i}",
            "status_interval": "60s",
            "shutdown_timeout": "10s",
            "http": {"listen": f"127.0.0.1:{port}"},
            "batching": {"debounce": "50ms", "max_delay": "500ms", **(batching or {})},
            "ownership": OWNERSHIP,
            "managers": [
                {
                    "name": name,
                    "provider": "awesome_cloud",
                    "endpoint": endpoints[name].url,
                    "refresh_interval": "24h",
                    **(manager_options or {}),
                }
                for name in clouds
            ],
        }
        if kafka is not None:
            bootstrap, topic, group = kafka
            config["catchers"] = [
                {
                    "type": "kafka",
                    "name": "kafka-scaleout",
                    "bootstrap_servers": bootstrap,
                    "topics": [topic],
                    "group_id": group,
                    "manager_attribute": "source",
                    **CATCHER_OPTIONS,
                }
            ]
        path = write_config(tmp_path / f"refreshd-p{i}.toml", config)
        daemons.append(DaemonProcess(path, http_port=port, log_path=tmp_path / f"p{i}.log"))
    cluster = Cluster(pg_url, create_engine(pg_url), clouds, servers, slow_servers, daemons)
    if kafka is not None:
        bootstrap, topic, _ = kafka
        cluster.topic = topic
        for name, cloud in clouds.items():
            delivery = Delivery(
                cloud, KafkaTransport(bootstrap, topic, key=name, mode="structured")
            )
            cluster.deliveries.append(delivery)
            cluster.tasks.append(asyncio.create_task(delivery.run(start_after=0)))
    return cluster
