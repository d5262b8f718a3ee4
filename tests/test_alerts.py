"""The shipped alert rules (promtool unit tests) and a real Prometheus scraping a real daemon.

Needs Debian's ``prometheus`` package (promtool and the server); scripts/test.sh
installs it when missing.  Prometheus is started as a plain process on a free
loopback port with a temporary config and storage directory, never as a service.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from daemon.service.config import parse_config
from daemon.service.lifecycle import Daemon
from tests.daemon_process import free_port, wait_for
from tests.test_operator_metrics import daemon_config

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing (apt-get install prometheus; scripts/test.sh does)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus missing (apt-get install prometheus)"
)


@needs_promtool
def test_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    assert PROMTOOL is not None
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "6 rules found" in check.stdout
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


@pytest.fixture
async def daemon_url(tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    d = Daemon(parse_config(daemon_config(tmp_path, port)))
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    try:
        await wait_for(lambda: d.readiness.ready or task.done(), timeout=30, what="ready")
        assert not task.done(), task.exception() if task.done() else ""
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


@needs_prometheus
async def test_prometheus_scrapes_the_daemon_and_sees_its_freshness(
    daemon_url: str, tmp_path: Path
) -> None:
    assert PROMETHEUS is not None
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES / 'alerts.yml'}\n"
        "scrape_configs:\n  - job_name: refreshd\n"
        f"    static_configs:\n      - targets: ['{daemon_url}']\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    query = 'refreshd_manager_last_success_timestamp_seconds{manager="awesome",kind="full"} > 0'
    try:
        async with aiohttp.ClientSession() as session:

            async def fresh() -> list[dict[str, object]] | None:
                assert server.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    async with session.get(f"{api}/query", params={"query": query}) as resp:
                        body = await resp.json()
                except aiohttp.ClientError:
                    return None
                result: list[dict[str, object]] = body["data"]["result"]
                return result or None

            (sample,) = await wait_for(fresh, timeout=60, interval=0.5, what="the scraped metric")
            assert sample["metric"] == {  # type: ignore[comparison-overlap]
                "__name__": "refreshd_manager_last_success_timestamp_seconds",
                "manager": "awesome",
                "kind": "full",
                "instance": daemon_url,
                "job": "refreshd",
            }
            # the shipped rules load in the real server, and none fires for a healthy daemon
            async with session.get(f"{api}/rules") as resp:
                groups = (await resp.json())["data"]["groups"]
            rules = {r["name"]: r for g in groups for r in g["rules"]}
            assert "RefreshdManagerStale" in rules
            assert rules["RefreshdManagerStale"]["health"] == "ok"
            assert all(r["state"] == "inactive" for r in rules.values())
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
