"""The small-batch save path and the staged path leave identical tables (SQLite and PostgreSQL).

Two managers of one database start from the same full refresh; the same targeted
refreshes (random vms, some gone or new, some flavors/images/security groups
targeted too, pages split at random) are then saved for one by a persister whose
targeted refreshes all take the small-batch path, for the other by one whose
refreshes all take the staged path.  Both see the same clock, so every column
(timestamps included) must match once ids are replaced by the refs they stand
for; so must the counts and the ``refresh_runs`` rows.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.inventory import InventoryPage
from daemon.model.targets import Target, TargetCollection
from daemon.persistence import schema
from daemon.persistence.persister import Persister
from daemon.persistence.refresh_result import RefreshResult
from daemon.persistence.settings import PersisterSettings
from tests.inventory_builders import CHILDREN, TOP_LEVEL, Cloud, pages, scenarios, snapshot

_managers = itertools.count()

OTHER_TARGETS = st.sets(
    st.sampled_from(
        [
            ("flavors", "f1"),
            ("flavors", "f9"),  # referred to by vms, never listed: skeletal, then archived
            ("images", "img2"),
            ("images", "img7"),  # never seen anywhere
            ("security_groups", "sg2"),
        ]
    ),
    max_size=2,
)


class Clock:
    """The same ``now`` for both persisters during one refresh."""

    def __init__(self) -> None:
        self.value = datetime(2026, 1, 1, tzinfo=UTC)

    def tick(self) -> None:
        self.value += timedelta(seconds=1)

    def __call__(self) -> datetime:
        return self.value


def targeted_pages(
    cloud: Cloud, vms: list[str], others: set[tuple[str, str]], split: bool
) -> list[InventoryPage]:
    """What a targeted collector yields: the vms' page plus the other targeted objects
    the cloud still has; with ``split``, the vms and their children come in a first
    page and the objects they refer to in a second (references before their objects).
    (Children never come before their vm: the staged path drops a child whose vm is
    only in a later page, the small-batch path, which merges pages, keeps it.)"""
    page = cloud.targeted_page(*vms)
    for coll, ref in sorted(others):
        row = getattr(cloud, coll).get(ref)
        if row is not None and all(r["ems_ref"] != ref for r in page.rows.get(coll, [])):
            page.add(coll, dict(row))
    if not split:
        return [page]
    owned = ("vms", *CHILDREN)
    first = InventoryPage({n: rows for n, rows in page.rows.items() if n in owned})
    second = InventoryPage({n: rows for n, rows in page.rows.items() if n not in owned})
    return [first, second]


async def comparable(engine: AsyncEngine, manager_id: int) -> dict[str, Any]:
    """Every row of the manager with ids replaced by refs, and its refresh_runs."""
    snap = await snapshot(engine, manager_id)
    ref_of = {c: {r["id"]: ref for ref, r in snap[c].items()} for c in TOP_LEVEL}
    out: dict[str, Any] = {}
    for coll in TOP_LEVEL:
        rows = {}
        for ref, row in snap[coll].items():
            row = {k: v for k, v in row.items() if k not in ("id", "manager_id")}
            if coll == "vms":
                row["flavor_id"] = ref_of["flavors"].get(row["flavor_id"])
                row["image_id"] = ref_of["images"].get(row["image_id"])
            rows[ref] = row
        out[coll] = rows
    for coll in CHILDREN:
        out[coll] = {
            key: {
                k: v
                for k, v in row.items()
                if k not in ("id", "manager_id", "vm_id", "security_group_id")
            }
            for key, row in snap[coll].items()
        }
    t = schema.refresh_runs
    async with engine.connect() as conn:
        result = await conn.execute(
            select(
                t.c.kind,
                t.c.targets,
                t.c.created,
                t.c.updated,
                t.c.archived,
                t.c.deleted,
                t.c.started_at,
                t.c.error,
                t.c.details,
            )
            .where(t.c.manager_id == manager_id)
            .order_by(t.c.id)
        )
        out["refresh_runs"] = [tuple(r) for r in result]
    return out


@settings(
    max_examples=40,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    scenario=scenarios(),
    others=OTHER_TARGETS,
    split=st.booleans(),
    again=st.booleans(),
)
async def test_small_batch_and_staged_paths_leave_identical_tables(
    engine: AsyncEngine,
    scenario: tuple[Cloud, Cloud, list[str]],
    others: set[tuple[str, str]],
    split: bool,
    again: bool,
) -> None:
    initial, cloud, chosen = scenario
    clock = Clock()
    n = next(_managers)
    small = Persister(engine, now=clock, settings=PersisterSettings(max_delete_ratio=1.0))
    staged = Persister(
        engine,
        now=clock,
        settings=PersisterSettings(max_delete_ratio=1.0, small_batch_max_targets=0),
    )
    ids = {
        "small": await small.ensure_manager(f"small{n}", "awesome_cloud"),
        "staged": await staged.ensure_manager(f"staged{n}", "awesome_cloud"),
    }
    results: dict[str, list[RefreshResult]] = {"small": [], "staged": []}
    rounds = 2 if again else 1  # a second identical refresh must write nothing on both
    for step in range(1 + rounds):
        clock.tick()
        for name, persister in (("small", small), ("staged", staged)):
            manager = f"{name}{n}"
            if step == 0:
                result = await persister.save(manager, pages(*initial.full_pages()))
            else:
                targets = TargetCollection(
                    manager,
                    [Target.of(manager, "vms", r) for r in chosen]
                    + [Target.of(manager, c, r) for c, r in sorted(others)],
                )
                batch = targeted_pages(cloud, chosen, others, split)
                result = await persister.save(manager, pages(*batch), targets=targets)
            results[name].append(result)

    assert [r.counts for r in results["small"]] == [r.counts for r in results["staged"]]
    if again:
        assert results["small"][-1].rows_written == 0
    assert await comparable(engine, ids["small"]) == await comparable(engine, ids["staged"])


async def test_a_bad_row_in_a_small_batch_is_isolated_by_the_staged_path(
    persister: Persister, engine: AsyncEngine
) -> None:
    """A batch with an object no table can hold (a disk without its device name) is not
    saved by the small-batch path: the staged path saves the rest, keeps the bad
    object's row as it was and records it in ``rejected_objects`` (semantic 13)."""
    mid = await persister.ensure_manager("m1", "awesome_cloud")
    cloud = Cloud().flavor("f1").image("img1").vm("a", disks=("sda",))
    await persister.save("m1", pages(*cloud.full_pages()))
    before = await snapshot(engine, mid)
    cloud.vms["a"]["name"] = "renamed"
    cloud.disks["a"]["sda"]["device_name"] = None
    targets = TargetCollection("m1", [Target.of("m1", "vms", "a")])

    result = await persister.save("m1", pages(cloud.targeted_page("a")), targets=targets)

    assert [(r.collection, r.reason.value) for r in result.rejected] == [("disks", "missing_key")]
    after = await snapshot(engine, mid)
    assert after["disks"] == before["disks"]  # the bad disk's siblings (and its row) stay
    assert [v["name"] for v in after["vms"].values()] == ["renamed"]
    async with engine.connect() as conn:
        listed = (await conn.execute(select(schema.rejected_objects))).mappings().all()
    assert [(r["collection"], r["reason"]) for r in listed] == [("disks", "missing_key")]


@pytest.mark.postgres
async def test_small_batch_save_waits_for_the_managers_lock(pg_url: str) -> None:
    """Semantics 6: a small-batch save takes the manager's advisory lock (the one the
    staged path and other processes take) before it writes anything."""
    import asyncpg

    from daemon.persistence.db import create_engine
    from daemon.persistence.dialect import ADVISORY_NAMESPACE
    from daemon.persistence.migrate import upgrade
    from tests.inventory_builders import until, vm_targets

    engine = create_engine(pg_url)
    holder = await asyncpg.connect(pg_url)
    try:
        await upgrade(engine)
        persister = Persister(engine)
        mid = await persister.ensure_manager("m1", "awesome_cloud")
        cloud = Cloud().flavor("f1").image("img1").vm("a")
        await persister.save("m1", pages(*cloud.full_pages()))
        cloud.vms["a"]["name"] = "renamed"

        tr = holder.transaction()
        await tr.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1, $2)", ADVISORY_NAMESPACE, mid)
        save = asyncio.create_task(
            persister.save("m1", pages(cloud.targeted_page("a")), targets=vm_targets("a"))
        )

        async def waiting() -> bool:
            return bool(
                await holder.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND NOT granted AND classid = $1 AND objid = $2 AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())",
                    ADVISORY_NAMESPACE,
                    mid,
                )
            )

        await until(waiting)
        assert not save.done()
        assert (await snapshot(engine, mid))["vms"]["a"]["name"] == "a"
        await tr.commit()
        result = await asyncio.wait_for(save, 10)
        assert result.counts["vms"].updated == 1
        assert (await snapshot(engine, mid))["vms"]["a"]["name"] == "renamed"
    finally:
        await holder.close()
        await engine.dispose()
