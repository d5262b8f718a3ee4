"""systemd integration: the unit file verifies, and the daemon speaks sd_notify.

The daemon runs as a real subprocess on SQLite with the embedded simulator;
the test plays systemd's part by listening on a datagram NOTIFY_SOCKET.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess, free_port, wait_for, write_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_file_verifies(tmp_path: Path) -> None:
    # verify resolves ExecStart; point it at a stand-in binary so only the unit is judged
    unit = (ROOT / "deploy" / "refreshd.service").read_text()
    fake = tmp_path / "refreshd"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    unit = unit.replace("/usr/local/bin/refreshd", str(fake))
    path = tmp_path / "refreshd.service"
    path.write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "refreshd.service" in line and "Cannot add dependency job" not in line
    ]
    assert result.returncode == 0 or not problems, result.stdout + result.stderr
    assert not problems, "\n".join(problems)


def test_unit_file_has_the_production_settings() -> None:
    unit = (ROOT / "deploy" / "refreshd.service").read_text()
    for setting in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "TimeoutStopSec=",
        "User=refreshd",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ):
        assert setting in unit, setting
    stop = int(unit.split("TimeoutStopSec=")[1].split()[0])
    assert stop > 30, "TimeoutStopSec must exceed the default shutdown_timeout (30 s)"


async def test_sd_notify_ready_status_watchdog_stopping(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    messages: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    port = free_port()
    config = write_config(
        tmp_path / "refreshd.toml",
        {
            "database_url": f"sqlite:///{tmp_path / 'r.db'}",
            "status_interval": 0.2,
            "http": {"listen": f"127.0.0.1:{port}"},
            "managers": [
                {
                    "name": "awesome",
                    "provider": "awesome_cloud",
                    "endpoint": "embedded",
                    "embedded_vms": 20,
                    "embedded_churn_per_second": 5.0,
                }
            ],
            "catchers": [{"type": "inprocess", "manager": "awesome"}],
        },
    )
    daemon = DaemonProcess(
        config,
        http_port=port,
        log_path=tmp_path / "log",
        env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"},
    )
    daemon.start()
    try:
        await wait_for(lambda: any("READY=1" in m for m in drain()), timeout=60, what="READY=1")
        # READY only once the database answers and the schema is current: /readyz agrees
        status, _ = await daemon.get("/readyz")
        assert status == 200
        await wait_for(
            lambda: any("WATCHDOG=1" in m for m in drain()), timeout=30, what="WATCHDOG=1"
        )
        await wait_for(
            lambda: any(m.startswith("STATUS=events in") for m in drain()),
            timeout=30,
            what="STATUS= with counters",
        )
        assert daemon.stop() == 0
        drain()
        assert any("STOPPING=1" in m for m in messages)
    finally:
        if daemon.alive():
            daemon.kill()
        sock.close()
    text = daemon.log()
    assert "all refreshes committed" in text


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    """A refresh hangs on a cloud that never answers: SIGTERM waits, a second SIGTERM exits."""
    connections: list[asyncio.StreamWriter] = []

    async def never_answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connections.append(w)

    cloud = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    cloud_port = cloud.sockets[0].getsockname()[1]
    port = free_port()
    config = write_config(
        tmp_path / "refreshd.toml",
        {
            "database_url": f"sqlite:///{tmp_path / 'r.db'}",
            "shutdown_timeout": 300,
            "http": {"listen": f"127.0.0.1:{port}"},
            "managers": [
                {
                    "name": "stuck",
                    "provider": "awesome_cloud",
                    "endpoint": f"http://127.0.0.1:{cloud_port}",
                    "request_timeout": 300,
                }
            ],
        },
    )
    daemon = DaemonProcess(config, http_port=port, log_path=tmp_path / "log")
    daemon.start()
    try:
        await daemon.wait_ready()
        await wait_for(lambda: connections, timeout=30, what="the full refresh to start")
        daemon.signal(signal.SIGTERM)
        await wait_for(lambda: "flushing" in daemon.log(), timeout=30, what="graceful shutdown")
        assert daemon.alive(), "the first signal must wait for the in-flight refresh"
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = daemon.wait(15)
        assert code == 128 + signal.SIGTERM, daemon.log()[-2000:]
        assert time.monotonic() - started < 10
        assert "second signal" in daemon.log()
    finally:
        if daemon.alive():
            daemon.kill()
        cloud.close()
        for w in connections:
            w.close()
