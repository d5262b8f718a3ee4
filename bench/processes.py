"""Child processes of a benchmark and the bounded waits on them: free ports, polling,
HTTP probes, stopping a child, cancelling the run on SIGTERM / Ctrl-C.

Flow: benchmark script -> **processes** -> simulator, broker, `refreshd run` children.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

BIN = Path(sys.executable).parent
"""The venv's bin directory: ``refreshd``, ``moto_server``."""
REFRESHD = BIN / "refreshd"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def poll(
    condition: Callable[[], Any],
    timeout: float,
    interval: float = 0.2,
    *,
    tolerate: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``condition`` (sync or async) until truthy and return its value; False after
    ``timeout`` seconds (it is asked at least once).  ``tolerate``: exceptions that count
    as a falsy answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
        except tolerate:
            value = False
        if value:
            return value
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


async def until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
) -> Any:
    """:func:`poll`, raising TimeoutError after ``timeout`` seconds."""
    value = await poll(condition, timeout, interval)
    if not value:
        raise TimeoutError(f"timed out waiting for {what}")
    return value


async def http_ok(url: str) -> bool:
    """GET ``url`` answers 200 (within 10 s)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.get(url) as resp,
        ):
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def wait_http(url: str, timeout: float = 120) -> None:
    await until(lambda: http_ok(url), timeout, url)


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM our own child (by its pid), SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cancel_on_signals() -> None:
    """SIGTERM and Ctrl-C cancel the running task (the benchmark's main)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)


class Child:
    """A child process with its output in ``log``."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def rss_mb(self) -> float:
        return psutil.Process(self.p.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        stop_process(self.p, 60)

    def alive(self) -> bool:
        return self.p.poll() is None
