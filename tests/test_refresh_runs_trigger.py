"""``refresh_runs.trigger`` says why each refresh ran; old runs are pruned (``keep_runs``)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from sqlalchemy import insert, select

from daemon.model.acks import Ack
from daemon.model.targets import Target, TargetCollection, Trigger
from daemon.persistence import schema
from daemon.persistence.db import create_engine
from daemon.persistence.migrate import upgrade
from daemon.pipeline.batcher import Batcher, BatchingSettings
from daemon.pipeline.ownership import LocalOwnership
from daemon.pipeline.scheduler import Scheduler
from daemon.service.config import parse_config
from daemon.service.lifecycle import Daemon
from tests.daemon_process import free_port, wait_for
from tests.fake_clock import FakeClock


async def test_runs_record_their_trigger_and_old_runs_are_pruned(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    engine = create_engine(url)
    long_ago = datetime.now(UTC) - timedelta(days=3)
    await upgrade(engine)
    async with engine.begin() as conn:
        manager_id = (
            await conn.execute(
                insert(schema.managers)
                .values(
                    name="awesome",
                    provider="awesome_cloud",
                    created_at=long_ago,
                    updated_at=long_ago,
                )
                .returning(schema.managers.c.id)
            )
        ).scalar_one()
        for days in (3, 2):
            await conn.execute(
                insert(schema.refresh_runs).values(
                    manager_id=manager_id,
                    kind="full",
                    trigger="scheduled",
                    targets=1,
                    created=0,
                    updated=0,
                    archived=0,
                    deleted=0,
                    duration=1.0,
                    started_at=datetime.now(UTC) - timedelta(days=days),
                )
            )
    port = free_port()
    daemon = Daemon(
        parse_config(
            {
                "database_url": url,
                "batching": {"debounce": 0.01, "max_delay": 0.1},
                "persister": {"keep_runs": "1d"},
                "http": {"listen": f"127.0.0.1:{port}"},
                "managers": [
                    {
                        "name": "awesome",
                        "provider": "awesome_cloud",
                        "endpoint": "embedded",
                        "embedded_vms": 20,
                        "embedded_churn_per_second": 20.0,
                    }
                ],
                "catchers": [{"type": "inprocess", "manager": "awesome"}],
            }
        )
    )
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    runs = schema.refresh_runs

    async def triggers() -> list[tuple[str, str | None, datetime]]:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(runs.c.kind, runs.c.trigger, runs.c.started_at).order_by(runs.c.id)
            )
            return [tuple(r) for r in rows.all()]  # type: ignore[misc]

    try:
        await wait_for(lambda: daemon.readiness.ready or task.done(), timeout=30, what="ready")
        assert not task.done()
        # the runs older than a day are gone (pruned at start); the start-up refresh is there
        await wait_for(
            lambda: daemon.refreshes_ok > 0, timeout=30, what="the start-up full refresh"
        )

        async def pruned() -> bool:
            return all(
                started.replace(tzinfo=UTC) > long_ago + timedelta(days=2)
                for _, _, started in await triggers()
            )

        await wait_for(pruned, timeout=30, what="old runs pruned")
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            for body in (
                {"manager": "awesome"},
                {"manager": "awesome", "targets": ["vms:vm-000001"]},
            ):
                async with s.post(base + "/refresh?wait=true", json=body) as resp:
                    assert resp.status == 200

        async def seen_event() -> bool:
            return any(t == "event" for _, t, _ in await triggers())

        await wait_for(seen_event, timeout=30, what="a refresh triggered by events")
        recorded = [(kind, trigger) for kind, trigger, _ in await triggers()]
        assert ("full", "startup") in recorded  # events may be refreshed before it
        assert ("full", "manual") in recorded and ("targeted", "manual") in recorded
        assert ("targeted", "event") in recorded
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0
        await engine.dispose()


async def test_scheduler_and_batcher_name_the_trigger() -> None:
    clock = FakeClock()
    seen: list[tuple[bool, Trigger]] = []
    fail_next = [False]

    async def refresh(collection: TargetCollection) -> int:
        seen.append((collection.is_full, collection.trigger))
        if fail_next[0]:
            fail_next[0] = False
            raise RuntimeError("boom")
        return len(collection)

    batcher = Batcher(
        refresh,
        settings=BatchingSettings(
            debounce=0.1,
            max_delay=1.0,
            full_refresh_threshold=3,
            escalate_after=1,
            retry_jitter=0.0,
            retry_initial=1.0,
        ),
        clock=clock,
    )
    batcher.start()

    async def never_refreshed(_manager: str) -> datetime | None:
        return None  # the database's managers.last_full_refresh_at, as the scheduler reads it

    scheduler = Scheduler(
        batcher,
        intervals={"m": 100.0},
        clock=clock,
        ownership=LocalOwnership({"m": 1}, instance="test"),
        last_full=never_refreshed,
    )
    scheduler.plan({}, now_wall=datetime.now(UTC))
    loop = asyncio.create_task(scheduler.run())
    try:
        await clock.advance(1)
        assert seen == [(True, Trigger.STARTUP)]
        await clock.advance(100)
        assert seen[-1] == (True, Trigger.SCHEDULED)
        # (escalation by size follows measured costs: tests/test_batching_costs.py)
        # a failing targeted refresh is retried as a full one (escalate_after = 1)
        fail_next[0] = True
        batcher.submit([Target.of("m", "vms", "vm-9")], Ack(received_at=clock.now()))
        await clock.advance(1)
        assert seen[-1] == (False, Trigger.EVENT)
        await clock.advance(5)
        assert seen[-1] == (True, Trigger.ESCALATED)
    finally:
        loop.cancel()
        await asyncio.wait([loop])
        await batcher.close(cancel=True)
