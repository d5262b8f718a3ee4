"""The status page (``GET /``) in headless Chromium, and refresh progress on /managers.

A real daemon (SQLite) with three managers: an embedded cloud with an in-process
catcher, a slow remote cloud (its full refresh is in flight, with progress), and
one whose cloud does not answer (its last error shows).  Chromium is Debian's
``chromium`` driven through ``chromium-driver`` with selenium; the screenshot is
saved in the test's directory and in ``test-artifacts/`` (or $REFRESHD_ARTIFACTS_DIR).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.model.targets import Trigger
from daemon.persistence.refresh_result import RefreshKind
from daemon.pipeline.progress import ProgressBoard
from daemon.service.config import parse_config
from daemon.service.lifecycle import Daemon
from providers.awesome_cloud.simulator.app import FaultPlan
from providers.awesome_cloud.simulator.cloud import Cloud
from providers.awesome_cloud.simulator.server import SimulatorServer
from tests.daemon_process import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("REFRESHD_ARTIFACTS_DIR", ROOT / "test-artifacts"))
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, str, SimulatorServer]]:
    slow_cloud = Cloud.generate(vms=300, seed=5)
    async with SimulatorServer(slow_cloud) as slow:
        port = free_port()
        config = {
            "database_url": f"sqlite:///{tmp_path / 'r.db'}",
            # the unreachable manager's retry falls after the shutdown deadline: stopping
            # does not wait for it
            "batching": {"debounce": 0.01, "max_delay": 0.1, "retry_initial": 300},
            "http": {"listen": f"127.0.0.1:{port}"},
            "managers": [
                {
                    "name": "awesome",
                    "provider": "awesome_cloud",
                    "endpoint": "embedded",
                    "embedded_vms": 20,
                },
                {
                    "name": "slow",
                    "provider": "awesome_cloud",
                    "endpoint": slow.url,
                    "page_size": 5,
                },
                {
                    "name": "unreachable",
                    "provider": "awesome_cloud",
                    "endpoint": f"http://127.0.0.1:{free_port()}",
                    "retries": 0,
                },
            ],
            "catchers": [{"type": "inprocess", "manager": "awesome", "name": "awesome-events"}],
        }
        d = Daemon(parse_config(config))
        stop = asyncio.Event()
        task = asyncio.create_task(d.run(stop))
        try:
            await wait_for(lambda: d.readiness.ready or task.done(), timeout=30, what="ready")
            assert not task.done(), task.exception() if task.done() else ""
            yield d, f"http://127.0.0.1:{port}", slow
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 60) == 0


async def managers(url: str) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url + "/managers") as resp:
        body = await resp.json()
    return {m["name"]: m for m in body["managers"]}


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromium-driver missing (scripts/test.sh installs them)",
)
async def test_status_page_in_headless_chromium(
    daemon: tuple[Daemon, str, SimulatorServer], tmp_path: Path
) -> None:
    _, url, slow_cloud = daemon

    async def started() -> bool:
        m = await managers(url)
        return (
            m["awesome"]["last_full_refresh_at"] is not None
            and m["slow"]["last_full_refresh_at"] is not None
            and m["unreachable"]["last_refresh_error"] is not None
        )

    await wait_for(started, timeout=60, interval=0.1, what="the start-up refreshes")
    # a slow cloud: the next full refresh of "slow" takes a while
    slow_cloud.faults.set(FaultPlan(latency_ms=100))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/refresh", json={"manager": "slow"}) as resp,
    ):
        assert resp.status == 202

    async def in_flight() -> bool:
        progress = (await managers(url))["slow"]["progress"]
        return progress is not None and progress["pages"] >= 3

    await wait_for(in_flight, timeout=60, interval=0.1, what="the slow refresh in flight")
    # /managers shows the refresh in flight with its progress
    progress = (await managers(url))["slow"]["progress"]
    assert progress["kind"] == "full" and progress["trigger"] == "manual"
    assert progress["rows"] > 0 and progress["rows_per_second"] > 0

    page = await asyncio.to_thread(look_at, url + "/", tmp_path)
    assert page["title"].startswith("refreshd ")
    assert page["readiness"] == "ready"
    rows = page["managers"]
    assert "ago" in rows["awesome"]["freshness"] and "idle" in rows["awesome"]["progress"]
    assert "full (manual)" in rows["slow"]["progress"] and "pages" in rows["slow"]["progress"]
    assert "rows/s" in rows["slow"]["progress"]
    assert "ProviderError" in rows["unreachable"]["error"]
    assert rows["unreachable"]["freshness"].startswith("never")
    assert "failed 1 time(s) in a row; retry in" in rows["unreachable"]["progress"]
    assert page["catchers"]["awesome-events"]["state"] == "up"
    assert "startup" in page["triggers"]
    screenshot = tmp_path / "status_page.png"
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / "status_page.png")


def look_at(url: str, tmp_path: Path) -> dict[str, Any]:
    """Open ``url`` in headless Chromium, read what a person sees, save a screenshot."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(url)
        seen: dict[str, Any] = {
            "title": driver.title,
            "readiness": driver.find_element(By.ID, "readiness").text,
            "managers": {},
            "catchers": {},
        }
        for row in driver.find_elements(By.CSS_SELECTOR, "#managers tr[data-manager]"):
            cells = row.find_elements(By.TAG_NAME, "td")
            seen["managers"][row.get_attribute("data-manager")] = {
                "freshness": cells[2].text,
                "error": cells[4].text,
                "pending": cells[5].text,
                "progress": cells[6].text,
            }
        for row in driver.find_elements(By.CSS_SELECTOR, "#catchers tr[data-catcher]"):
            state = row.find_element(By.CLASS_NAME, "state").text
            seen["catchers"][row.get_attribute("data-catcher")] = {"state": state}
        seen["triggers"] = [
            cell.text for cell in driver.find_elements(By.CSS_SELECTOR, "#runs td.trigger")
        ]
        driver.save_screenshot(str(tmp_path / "status_page.png"))
        return seen
    finally:
        driver.quit()


def test_a_long_refresh_logs_its_progress_every_few_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    board = ProgressBoard(clock=lambda: now[0], log_every=5.0)
    progress = board.start("big", kind=RefreshKind.FULL, trigger=Trigger.SCHEDULED, targets=1)
    with caplog.at_level(logging.INFO, logger="daemon.pipeline.progress"):
        for _ in range(12):  # a page of 1000 rows every second
            now[0] += 1.0
            board.page(progress, 1000)
        assert board.current("big") == {
            **board.current("big"),  # type: ignore[dict-item]
            "pages": 12,
            "rows": 12000,
            "rows_per_second": 1000.0,
        }
        board.finish(progress)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "manager big: full refresh in progress 5s: 5 pages, 5000 rows, 1000 rows/s",
        "manager big: full refresh in progress 10s: 10 pages, 10000 rows, 1000 rows/s",
        "manager big: full refresh ended after 12s: 12 pages, 12000 rows, 1000 rows/s",
    ]
    assert board.current("big") is None
