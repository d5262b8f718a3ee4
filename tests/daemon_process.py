"""`refreshd run` as a real subprocess, for end-to-end tests.

Writes a TOML config, starts the daemon with the test's environment, waits on
``/readyz`` (with a timeout, never a fixed delay), and stops it with SIGTERM,
SIGKILL or a second signal.  Output goes to a log file the test can read.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

REFRESHD = str(Path(sys.executable).with_name("refreshd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """A small TOML writer: top-level scalars, tables, and arrays of tables."""
    lines: list[str] = []
    for key, value in config.items():
        if not isinstance(value, (Mapping, list)) or (
            isinstance(value, list) and not all(isinstance(v, Mapping) for v in value)
        ):
            lines.append(f"{key} = {toml_value(value)}")
    for key, value in config.items():
        if isinstance(value, Mapping):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                lines.append(f"\n[[{key}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def wait_for(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition`` (sync or async) until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(interval)


class DaemonProcess:
    def __init__(
        self,
        config_path: Path,
        *,
        http_port: int,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config_path = config_path
        self.http_port = http_port
        self.log_path = log_path
        self.env = dict(os.environ) | dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [REFRESHD, "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(self.url + path) as resp:
            return resp.status, await resp.text()

    async def ready(self) -> bool:
        if not self.alive():
            raise AssertionError(
                f"refreshd exited ({self.proc and self.proc.returncode}):\n" + self.log()[-3000:]
            )
        try:
            status, _ = await self.get("/readyz")
        except aiohttp.ClientError:
            return False
        return status == 200

    async def wait_ready(self, timeout: float = 60) -> None:
        await wait_for(self.ready, timeout=timeout, interval=0.1, what="refreshd /readyz")

    async def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Sum of the samples of ``name`` matching ``labels`` on /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        _, text = await self.get("/metrics")
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in (labels or {}).items()
                ):
                    total += sample.value
        return total

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if not self.alive():
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                "refreshd did not stop within the timeout:\n" + self.log()[-3000:]
            ) from None
