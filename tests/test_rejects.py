"""One bad object does not stop its manager (DESIGN.md semantic 13), on SQLite and PostgreSQL.

Values that only need normalising are stored (long strings in text columns; NUL
and lone surrogates as U+FFFD); what no table can hold is rejected alone: the
rest of the refresh is saved, the object is listed in ``rejected_objects`` and
its existing row (and a vm's children) stays as it was until it saves.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.inventory import InventoryPage
from daemon.model.rejection import Rejection, RejectReason
from daemon.persistence import schema
from daemon.persistence.db import Dialect, dialect_of
from daemon.persistence.persister import Persister
from daemon.persistence.refresh_result import RefreshResult
from daemon.service.metrics import Metrics
from tests.inventory_builders import (
    MANAGER,
    Cloud,
    fleet,
    normalize,
    of_vms,
    pages,
    runs,
    scenarios,
    snapshot,
    vm_targets,
)

R = "\ufffd"

# vm ref -> (values the cloud gives, values the database must hold)
STORED_POISON: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "long-name": ({"name": "n" * 300}, {"name": "n" * 300}),
    "long-state": ({"state": "s" * 70}, {"state": "s" * 70}),
    "nul-name": ({"name": "a\x00b"}, {"name": f"a{R}b"}),
    "nul-tag": ({"tags": {"k\x00": "v\x00"}}, {"tags": {f"k{R}": f"v{R}"}}),
    "lone-surrogate": (
        {"name": "x\ud800y", "tags": {"t": "\udc80", "ok": "\ud83d\ude00"}},
        {"name": f"x{R}y", "tags": {"t": R, "ok": "\U0001f600"}},
    ),
}
# vm refs the cloud gives -> as stored
POISON_IDS = {"i" * 300: "i" * 300, "nul\x00id": f"nul{R}id", "sur\udfffid": f"sur{R}id"}


async def rejected_objects(engine: AsyncEngine) -> dict[tuple[str, str], dict[str, Any]]:
    t = schema.rejected_objects
    async with engine.connect() as conn:
        rows = (await conn.execute(select(t))).mappings().all()
    return {(r["collection"], r["ref"]): dict(r) for r in rows}


def rejected_samples(result: RefreshResult) -> dict[tuple[str, str, str], float]:
    metrics = Metrics()
    metrics.refresh_succeeded(result)
    text_ = generate_latest(metrics.registry).decode()
    return {
        (s.labels["manager"], s.labels["collection"], s.labels["reason"]): s.value
        for f in text_string_to_metric_families(text_)
        for s in f.samples
        if s.name == "refreshd_objects_rejected_total"
    }


async def test_poison_values_do_not_stop_100_other_changes(
    persister: Persister, engine: AsyncEngine
) -> None:
    cloud = fleet(100)
    await persister.save(MANAGER, pages(*cloud.full_pages()))
    for ref in list(cloud.vms):
        cloud.vms[ref]["name"] = f"{ref}-renamed"  # 100 ordinary changes
    for ref, (values, _) in STORED_POISON.items():
        cloud.vm(ref, **values)
    for ref in POISON_IDS:
        cloud.vm(ref)
    # what no table can hold: a disk size beyond 32 bits, NaN in JSON
    cloud.vm("huge-disk", disks=("sda", "sdb"))
    cloud.disks["huge-disk"]["sdb"]["size_gb"] = 2**40
    cloud.vm("nan-extra", extra={"x": float("nan")})
    refs = list(cloud.vms)

    result = await persister.save(
        MANAGER, pages(cloud.targeted_page(*refs)), targets=vm_targets(*refs)
    )

    after = await snapshot(engine)
    for i in range(100):
        assert after["vms"][f"v{i}"]["name"] == f"v{i}-renamed"
    for ref, (_, stored) in STORED_POISON.items():
        assert {k: after["vms"][ref][k] for k in stored} == stored
    for stored_ref in POISON_IDS.values():
        assert after["vms"][stored_ref]["archived_at"] is None
    assert after["vms"]["huge-disk"]["archived_at"] is None
    assert set(after["disks"]) >= {("huge-disk", "sda")}
    assert ("huge-disk", "sdb") not in after["disks"]
    assert "nan-extra" not in after["vms"]

    assert {(r.collection, r.ref, r.reason) for r in result.rejected} == {
        ("disks", "vm=huge-disk,device_name=sdb", RejectReason.OUT_OF_RANGE),
        ("vms", "nan-extra", RejectReason.INVALID_JSON),
    }
    listed = await rejected_objects(engine)
    assert set(listed) == {("disks", "vm=huge-disk,device_name=sdb"), ("vms", "nan-extra")}
    assert listed[("vms", "nan-extra")]["count"] == 1
    assert "size_gb" in listed[("disks", "vm=huge-disk,device_name=sdb")]["error"]
    assert (await runs(engine))[-1]["details"]["rejected"] == {"disks": 1, "vms": 1}
    assert rejected_samples(result) == {
        (MANAGER, "disks", "out_of_range"): 1.0,
        (MANAGER, "vms", "invalid_json"): 1.0,
    }

    # saving again is idempotent for the normalised values, and counts the rejections
    again = await persister.save(
        MANAGER, pages(cloud.targeted_page(*refs)), targets=vm_targets(*refs)
    )
    assert again.rows_written == 0
    assert (await rejected_objects(engine))[("vms", "nan-extra")]["count"] == 2

    # fixed in the cloud: saved on the next event, and no longer listed
    cloud.disks["huge-disk"]["sdb"]["size_gb"] = 40
    cloud.vms["nan-extra"]["extra"] = {"x": 1.5}
    fixed = ["huge-disk", "nan-extra"]
    result = await persister.save(
        MANAGER, pages(cloud.targeted_page(*fixed)), targets=vm_targets(*fixed)
    )
    assert result.rejected == []
    assert await rejected_objects(engine) == {}
    after = await snapshot(engine)
    assert after["disks"][("huge-disk", "sdb")]["size_gb"] == 40
    assert after["vms"]["nan-extra"]["extra"] == {"x": 1.5}


async def test_a_vm_gone_with_a_poison_ref_is_archived(
    persister: Persister, engine: AsyncEngine
) -> None:
    """Targets carry the cloud's ref: the sweep normalises it like the row's key."""
    cloud = fleet(2).vm("nul\x00id", disks=("sda",))
    await persister.save(MANAGER, pages(*cloud.full_pages()))
    cloud.remove_vm("nul\x00id")
    result = await persister.save(
        MANAGER, pages(cloud.targeted_page("nul\x00id")), targets=vm_targets("nul\x00id")
    )
    assert result.details() == {"vms": {"archived": 1}, "disks": {"deleted": 1}}


async def test_rejected_objects_are_not_gone_for_a_full_refresh(
    persister: Persister, engine: AsyncEngine
) -> None:
    cloud = fleet(10)
    await persister.save(MANAGER, pages(*cloud.full_pages()))
    before = await snapshot(engine)
    cloud.remove_vm("v3")  # really gone
    broken = cloud.copy()  # what the collector and parser make of it during the incident
    broken.vms["v1"]["extra"] = {"x": float("inf")}  # v1 cannot be saved
    broken.disks["v2"]["sda"]["size_gb"] = -(2**40)  # one disk of v2 cannot be saved
    del broken.disks["v2"]["sdb"]  # ... and its list is incomplete: sdb must stay
    broken.remove_vm("v4")  # the parser could not read v4 (it says so)
    parse_failed = InventoryPage(
        rejected=[Rejection("vms", "v4", RejectReason.PARSE_ERROR, "KeyError: 'id'")]
    )

    result = await persister.save(MANAGER, pages(*broken.full_pages(vms_per_page=3), parse_failed))

    after = await snapshot(engine)
    for kept in ("v1", "v4"):  # rejected vms: row and children as they were
        assert of_vms(after, [kept]) == of_vms(before, [kept])
    assert of_vms(after, ["v2"])["disks"] == of_vms(before, ["v2"])["disks"]
    assert after["vms"]["v3"]["archived_at"] is not None
    assert not any(k[0] == "v3" for k in after["disks"])
    assert result.held_deletion is None
    assert set(await rejected_objects(engine)) == {
        ("vms", "v1"),
        ("vms", "v4"),
        ("disks", "vm=v2,device_name=sda"),
    }
    assert {(r.ref, r.reason) for r in result.rejected if r.collection == "vms"} == {
        ("v1", RejectReason.INVALID_JSON),
        ("v4", RejectReason.PARSE_ERROR),
    }

    # the cloud answers properly again: everything saves and the list empties
    result = await persister.save(MANAGER, pages(*cloud.full_pages()))
    assert result.rejected == []
    assert await rejected_objects(engine) == {}
    assert normalize(await snapshot(engine)) == cloud.normalized()


async def test_rejected_vm_is_not_gone_for_a_targeted_refresh(
    persister: Persister, engine: AsyncEngine
) -> None:
    cloud = fleet(3)
    await persister.save(MANAGER, pages(*cloud.full_pages()))
    before = await snapshot(engine)
    cloud.vm("v1", disks=(), tags={"bad": float("nan")})  # v1's disks would go if it saved
    cloud.vms["v2"]["name"] = "v2-new"
    result = await persister.save(
        MANAGER, pages(cloud.targeted_page("v1", "v2")), targets=vm_targets("v1", "v2")
    )
    after = await snapshot(engine)
    assert of_vms(after, ["v1"]) == of_vms(before, ["v1"])
    assert after["vms"]["v2"]["name"] == "v2-new"
    assert [r.ref for r in result.rejected] == ["v1"]


async def test_a_row_the_database_refuses_is_isolated(
    persister: Persister, engine: AsyncEngine
) -> None:
    """What the row check cannot foresee (here a constraint an operator added) is found
    by the database; the refresh saves everything else, targeted and full alike."""
    postgres = dialect_of(engine) is Dialect.POSTGRESQL
    async with engine.begin() as conn:
        if postgres:
            await conn.execute(
                text("ALTER TABLE vms ADD CONSTRAINT test_no_evil CHECK (name <> 'evil')")
            )
        else:
            await conn.execute(
                text(
                    "CREATE TRIGGER test_no_evil BEFORE INSERT ON vms WHEN NEW.name = 'evil' "
                    "BEGIN SELECT RAISE(ABORT, 'no evil'); END"
                )
            )
    try:
        cloud = fleet(10)
        cloud.vms["v5"]["name"] = "evil"
        # a streamed full refresh cannot be read twice: it fails, and its retry isolates
        with pytest.raises(DBAPIError):
            await persister.save(MANAGER, pages(*cloud.full_pages(vms_per_page=4)))
        assert (await snapshot(engine))["vms"] == {}
        assert (await runs(engine))[-1]["error"]  # recorded as failed
        result = await persister.save(MANAGER, pages(*cloud.full_pages(vms_per_page=4)))
        after = await snapshot(engine)
        assert set(after["vms"]) == {f"v{i}" for i in range(10)} - {"v5"}
        assert [(r.collection, r.ref, r.reason) for r in result.rejected] == [
            ("vms", "v5", RejectReason.DATABASE_ERROR)
        ]
        assert result.counts["vms"].created == 9

        # a targeted refresh (its pages in a list, as the refresher gives them): saved
        # again, isolating, after the database refused it once
        cloud.vm("evil-too", name="evil")
        cloud.vms["v6"]["name"] = "v6-new"
        refs = ["v5", "v6", "evil-too"]
        result = await persister.save(
            MANAGER, [cloud.targeted_page(*refs)], targets=vm_targets(*refs)
        )
        after = await snapshot(engine)
        assert after["vms"]["v6"]["name"] == "v6-new"
        assert {r.ref for r in result.rejected} == {"v5", "evil-too"}
        assert set(await rejected_objects(engine)) == {("vms", "v5"), ("vms", "evil-too")}

        # the next full refresh isolates from the start (the database still refuses v5)
        result = await persister.save(MANAGER, pages(*cloud.full_pages(vms_per_page=4)))
        assert {r.ref for r in result.rejected} == {"v5", "evil-too"}
    finally:
        async with engine.begin() as conn:
            if postgres:
                await conn.execute(text("ALTER TABLE vms DROP CONSTRAINT test_no_evil"))
            else:
                await conn.execute(text("DROP TRIGGER test_no_evil"))


# -- property: bad objects change nothing but themselves --------------------------------

_managers = itertools.count()


@st.composite
def poisoned_scenarios(
    draw: st.DrawFn,
) -> tuple[Cloud, Cloud, list[str], dict[str, str]]:
    initial, cloud, chosen = draw(scenarios())
    live = [r for r in chosen if r in cloud.vms]
    poison = draw(
        st.fixed_dictionaries({r: st.sampled_from(["none", "reject", "normalise"]) for r in live})
    )
    return initial, cloud, chosen, {r: p for r, p in poison.items() if p != "none"}


@settings(
    max_examples=25,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=poisoned_scenarios())
async def test_bad_objects_change_nothing_but_themselves(
    persister: Persister,
    engine: AsyncEngine,
    scenario: tuple[Cloud, Cloud, list[str], dict[str, str]],
) -> None:
    initial, cloud, chosen, poison = scenario
    manager = f"p{next(_managers)}"  # one manager per example: examples share the database
    mid = await persister.ensure_manager(manager, "awesome_cloud")
    await persister.save(manager, pages(*initial.full_pages()))
    before = await snapshot(engine, mid)
    expected = cloud.copy()
    for ref, kind in poison.items():
        if kind == "reject":
            cloud.vms[ref]["extra"] = {"x": float("nan")}
        else:
            cloud.vms[ref]["name"] = "a\x00b"
            expected.vms[ref]["name"] = f"a{R}b"

    result = await persister.save(
        manager, [cloud.targeted_page(*chosen)], targets=vm_targets(*chosen, manager=manager)
    )

    after = await snapshot(engine, mid)
    rejected = sorted(r for r, kind in poison.items() if kind == "reject")
    assert sorted(r.ref for r in result.rejected) == rejected
    unchanged = [r for r in before["vms"] if r not in chosen or r in rejected]
    assert of_vms(after, unchanged) == of_vms(before, unchanged)
    assert not any(r in after["vms"] for r in rejected if r not in before["vms"])
    saved = [r for r in chosen if r in cloud.vms and r not in rejected]
    assert of_vms(normalize(after), saved) == of_vms(expected.normalized(), saved)


async def test_a_parser_rejection_with_a_poison_ref_is_stored_and_keeps_its_row(
    persister: Persister, engine: AsyncEngine
) -> None:
    cloud = fleet(3).vm("bad\x00", disks=("sda",))
    await persister.save(MANAGER, pages(*cloud.full_pages()))
    cloud.remove_vm("bad\x00")  # unreadable now, not gone
    unreadable = InventoryPage(
        rejected=[Rejection("vms", "bad\x00", RejectReason.PARSE_ERROR, "ValueError: \x00")]
    )
    result = await persister.save(MANAGER, pages(*cloud.full_pages(), unreadable))
    assert result.total.archived == result.total.deleted == 0
    after = await snapshot(engine)
    assert after["vms"][f"bad{R}"]["archived_at"] is None
    assert (f"bad{R}", "sda") in after["disks"]
    listed = await rejected_objects(engine)
    assert listed[("vms", f"bad{R}")]["error"] == f"ValueError: {R}"
