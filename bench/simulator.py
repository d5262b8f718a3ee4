"""The AwesomeCloud simulator as a benchmark uses it: its command line, a simulator child
process that is ready when its ``/healthz`` answers, and changes through its admin API.

Flow: benchmark script -> **simulator** (own process) <- refreshd's collector (HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from machine import ROOT
from processes import REFRESHD, free_port, http_ok, poll


def simulator_command(
    port: int, vms: int, *, seed: int = 1, churn: float = 0.0, bootstrap: str = "", topic: str = ""
) -> list[str]:
    """``refreshd simulator``: changing itself ``churn`` times a second, delivering its
    events to Kafka topic ``topic`` when ``bootstrap`` is given."""
    args = [str(REFRESHD), "simulator", "--port", str(port), "--vms", str(vms), "--seed", str(seed)]
    if churn:
        args += ["--churn-per-second", str(churn)]
    if bootstrap:
        args += ["--kafka-bootstrap", bootstrap, "--kafka-topic", topic]
    return args


@dataclass
class SimulatorProcess:
    url: str
    proc: asyncio.subprocess.Process
    ready_seconds: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        try:
            return psutil.Process(self.proc.pid).memory_info().rss
        except psutil.Error:
            return 0


@contextlib.asynccontextmanager
async def simulator_process(
    vms: int, *, seed: int = 1, timeout: float = 300.0
) -> AsyncIterator[SimulatorProcess]:
    """``refreshd simulator --port P --vms N --seed S`` in its own process, until exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(f"/tmp/refreshd-bench-simulator-{port}.log", "wb")  # noqa: SIM115
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *simulator_command(port, vms, seed=seed),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(ROOT),
    )
    failed = True
    try:
        ready = await poll(
            lambda: proc.returncode is not None or http_ok(f"{url}/healthz"), timeout, 0.1
        )
        if proc.returncode is not None:
            raise RuntimeError(f"simulator exited with {proc.returncode}; see {log.name}")
        if not ready:
            raise TimeoutError(f"simulator not ready after {timeout}s; see {log.name}")
        yield SimulatorProcess(url, proc, time.perf_counter() - t0)
        failed = False
    finally:
        if proc.returncode is None:
            proc.terminate()  # our own child, by pid
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
        if not failed:
            Path(log.name).unlink(missing_ok=True)  # kept only to diagnose a failure


async def patch_vms(
    url: str, changes: dict[str, dict[str, Any]], *, concurrency: int = 16
) -> float:
    """PATCH /admin/v1/vms/{id} for each (id -> fields); returns the seconds it took."""
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as http:

        async def one(vm_id: str, fields: dict[str, Any]) -> None:
            async with sem, http.patch(f"{url}/admin/v1/vms/{vm_id}", json=fields) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"PATCH {vm_id}: {resp.status} {await resp.text()}")

        await asyncio.gather(*(one(i, f) for i, f in changes.items()))
    return time.perf_counter() - t0


async def http_json(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """One request to the simulator's (or the daemon's) API: status and JSON answer."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.request(method, url, json=body) as resp,
    ):
        data = await resp.json() if resp.status != 204 else None
        return resp.status, data


class ApiCloud:
    """The simulator's cloud as read through its API, shaped like ``Cloud.snapshot()``."""

    def __init__(self, objects: dict[str, dict[str, dict[str, Any]]]) -> None:
        self._objects = objects

    def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        return self._objects

    @classmethod
    async def read(cls, url: str) -> ApiCloud:
        objects: dict[str, dict[str, dict[str, Any]]] = {}
        async with aiohttp.ClientSession() as http:
            for collection in ("flavors", "images", "security_groups", "vms"):
                objects[collection] = {}
                token: str | None = None
                while True:
                    params = {"limit": "5000", **({"page_token": token} if token else {})}
                    async with http.get(f"{url}/api/v1/{collection}", params=params) as resp:
                        resp.raise_for_status()
                        page = await resp.json()
                    for item in page["items"]:
                        objects[collection][item["id"]] = item
                    token = page["next_page_token"]
                    if not token:
                        break
        return cls(objects)
