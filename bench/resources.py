"""What a benchmark's processes use: peak RSS (sampled and ``ru_maxrss``) and CPU seconds,
of this process, of a child and of the PostgreSQL backends serving an engine.

Flow: benchmark script -> **resources** -> the RSS and CPU columns of its figures.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import psutil


def ru_maxrss_bytes() -> int:
    """Lifetime peak RSS of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Peak RSS of this process, sampled every ``interval`` seconds by a task."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._proc = psutil.Process()
        self.peak = 0
        self.start_rss = 0
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        if rss > self.peak:
            self.peak = rss

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> RssSampler:
        self.start_rss = self._proc.memory_info().rss
        self.peak = self.start_rss
        self._task = asyncio.create_task(self._run(), name="rss-sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._sample()
        self._task.cancel()
        await asyncio.wait([self._task])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def process_cpu(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (this one by default); 0 once it is gone."""
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


class BackendCpu:
    """CPU seconds of the PostgreSQL backends serving this engine's connections only
    (other sessions on a shared server are not counted)."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def attach(self, engine: Any) -> None:
        from sqlalchemy import event

        def on_connect(dbapi_connection: Any, _record: Any) -> None:
            cur = dbapi_connection.cursor()
            cur.execute("SELECT pg_backend_pid()")
            self.pids.add(int(cur.fetchone()[0]))
            cur.close()

        event.listen(engine.sync_engine, "connect", on_connect)

    def seconds(self) -> float:
        total = 0.0
        for pid in list(self.pids):
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                self.pids.discard(pid)
        return total


class NoBackend:
    """SQLite runs in this process: its CPU is in the refreshd column."""

    def attach(self, engine: Any) -> None:
        pass

    def seconds(self) -> float:
        return 0.0
