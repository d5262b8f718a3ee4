"""Full refreshes compare before they write (issue 9; DESIGN.md semantics 1, 5).

What a user of the database notices: a refresh that changes nothing neither writes
nor locks a stored row (PostgreSQL: its ``xmin``/``xmax`` stay as they were, so
readers, ``SELECT ... FOR UPDATE`` and vacuum see no activity); a refresh writes
exactly the changed rows; a manager's first refresh, which records no seen rows
for its vms and their children, leaves the same rows and counts as any other.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.persistence.persister import Persister
from tests.inventory_builders import (
    MANAGER,
    Cloud,
    fleet,
    manager_id,
    normalize,
    pages,
    snapshot,
)

TABLES = ("flavors", "images", "vms", "disks", "network_ports", "vm_security_groups")


def cloud_of(n: int) -> Cloud:
    cloud = fleet(n).security_group("sg1")
    for i in range(n):
        cloud.vm(f"v{i}", disks=("sda", "sdb"), ports=("p1",), sgs=("sg1",), tags={"i": i})
    return cloud


async def row_versions(engine: AsyncEngine) -> dict[str, list[tuple[str, str]]]:
    """(xmin, xmax) of every row: a write changes xmin, a row lock sets xmax."""
    out = {}
    async with engine.connect() as conn:
        for table in TABLES:
            rows = await conn.execute(
                text(f"SELECT xmin::text, xmax::text FROM {table} ORDER BY id")
            )
            out[table] = [tuple(r) for r in rows]
    return out


async def test_unchanged_rows_are_neither_written_nor_locked(
    persister: Persister, engine: AsyncEngine
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("row versions (xmin, xmax) are PostgreSQL's")
    cloud = cloud_of(20)
    await persister.save(MANAGER, pages(*cloud.full_pages(7)))
    before = await row_versions(engine)

    result = await persister.save(MANAGER, pages(*cloud.full_pages(7)))

    assert result.details() == {}
    assert await row_versions(engine) == before

    cloud.vm("v3", disks=("sda", "sdb"), ports=("p1",), sgs=("sg1",), tags={"i": "changed"})
    result = await persister.save(MANAGER, pages(*cloud.full_pages(7)))

    assert result.details() == {"vms": {"updated": 1}}
    after = await row_versions(engine)
    pairs = enumerate(zip(before["vms"], after["vms"], strict=True))
    changed = [i for i, (a, b) in pairs if a != b]
    assert len(changed) == 1
    after["vms"] = [v for i, v in enumerate(after["vms"]) if i not in changed]
    before["vms"] = [v for i, v in enumerate(before["vms"]) if i not in changed]
    assert after == before


async def test_first_refresh_then_changes_keep_exact_counts(
    persister: Persister, engine: AsyncEngine
) -> None:
    """The first refresh tracks no seen vms or children; the next one tracks them all."""
    cloud = cloud_of(6)
    cloud.vm("late", flavor="f-unlisted", sgs=("sg-unlisted",))  # skeletal rows
    first = await persister.save(MANAGER, pages(*cloud.full_pages(2)))
    assert first.details() == {
        "flavors": {"created": 2, "archived": 1},  # the unlisted one, swept at once
        "images": {"created": 1},
        "security_groups": {"created": 2, "archived": 1},
        "vms": {"created": 7},
        "disks": {"created": 13},
        "network_ports": {"created": 6},
        "vm_security_groups": {"created": 7},
    }
    assert normalize(await snapshot(engine)) == cloud.normalized()

    cloud.remove_vm("v0").vm("v1", disks=("sdc",), ports=(), sgs=(), tags={"i": 1})
    second = await persister.save(MANAGER, pages(*cloud.full_pages(2)))

    assert second.details() == {
        "vms": {"archived": 1},
        "disks": {"created": 1, "deleted": 4},
        "network_ports": {"deleted": 2},
        "vm_security_groups": {"deleted": 2},
    }
    assert normalize(await snapshot(engine)) == cloud.normalized()


async def test_pages_saved_one_by_one_or_merged_into_batches_give_the_same_result(
    engine: AsyncEngine,
) -> None:
    """A full refresh merges collector pages into save batches; saving every page on
    its own (a batch budget of one row) must leave the same rows and counts, including
    across pages: vms listed before their flavor, a vm listed twice, children whose vm
    came in an earlier page."""
    cloud = cloud_of(5).flavor("f-late", cpus=8)
    cloud.vm("v2", flavor="f-late", disks=("sda",), sgs=("sg1",))
    listing = cloud.full_pages(2)
    vms_first = [*listing[1:], listing[0], listing[1]]  # flavors last, one vm page twice
    results = {}
    for name, budget in (("one by one", 1), ("merged", 10_000)):
        persister = Persister(engine, full_batch_rows=budget)
        await persister.ensure_manager(name, "awesome_cloud")
        first = await persister.save(name, pages(*vms_first))
        changed = cloud.copy().remove_vm("v4").vm("v0", disks=("sdz",), tags={"i": "x"})
        second = await persister.save(name, pages(*changed.full_pages(2)))
        mid = await manager_id(engine, name)
        results[name] = (first.details(), second.details(), normalize(await snapshot(engine, mid)))

    assert results["one by one"] == results["merged"]
    first, second, rows = results["merged"]
    assert first["flavors"] == {"created": 2}  # f1 and f-late, each once
    assert second == {
        "vms": {"updated": 1, "archived": 1},
        "disks": {"created": 1, "deleted": 4},
        "network_ports": {"deleted": 2},
        "vm_security_groups": {"deleted": 2},
    }
    assert rows == changed.normalized()
