"""Property-based convergence tests (DESIGN.md semantics 1-5 and 11).

Random changes are made to an AwesomeCloud simulator through its API
(``Cloud.create`` / ``update`` / ``delete`` and ``churn``); the events they emit
are mapped to targets by the real event mapper (``providers.awesome_cloud.events``) and
refreshed by the real :class:`daemon.pipeline.refresher.Refresher` and
:class:`daemon.persistence.persister.Persister`, collecting over HTTP from the embedded
simulator.  Then:

1. every event delivered: after each change the database equals the cloud;
2. events dropped: one full refresh makes the database equal to the cloud;
3. scope: a targeted refresh changes no row outside its scope;
4. idempotence: refreshing again what was just refreshed writes nothing.

Each test runs on SQLite and PostgreSQL.  Hypothesis drives a sync test; each
example runs its async body on an event loop kept for the module
(``asyncio.Runner``, with one engine, as the daemon keeps them) against a
database migrated once and emptied at the start of each example.  Cloud changes
are drawn as small operation objects whose ``pick`` indices are resolved
against the cloud when they apply, so failures shrink to a short list of
readable steps; the concrete changes, draws and refresh counts of the failing
example are printed with it.  ``REFRESHD_CONVERGENCE_SCALE=20`` multiplies the
number of examples for a soak run; ``--hypothesis-show-statistics`` shows what
the refreshes did.

Skeletal rows: a vm may refer to an object the cloud does not have (deleted, or
not created yet).  The daemon then keeps a skeletal row (semantics 4) that only
a full refresh archives; tests 1 and 4 allow for exactly those rows.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from random import Random
from typing import Any

import pytest
from hypothesis import currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.targets import Target, TargetCollection
from daemon.persistence import schema
from daemon.persistence.db import create_engine
from daemon.persistence.migrate import upgrade
from daemon.persistence.refresh_result import RefreshResult
from daemon.pipeline.refresher import Refresher
from daemon.service.composition import assemble
from daemon.service.config import parse_config
from providers.awesome_cloud import AwesomeConnection
from providers.awesome_cloud.events import map_event
from providers.awesome_cloud.simulator.cloud import Cloud, CloudEvent
from providers.awesome_cloud.simulator.model import DISK_SIZES, OPERATING_SYSTEMS, VM_STATES
from tests.cloud_state import (
    assert_database_equals_cloud,
    cloud_state,
    database_state,
    diff_states,
    only_vms,
    skeletal_refs,
)

MANAGER = "m1"
NEIGHBOUR = "m2"
PROVIDER = "awesome_cloud"
REFERENCED = ("flavors", "images", "security_groups")
DEVICES = tuple(f"/dev/vd{c}" for c in "abcdef")

COMMON = settings(deadline=None)
SCALE = float(os.environ.get("REFRESHD_CONVERGENCE_SCALE", "1"))
"""Multiplies every test's ``max_examples`` (e.g. 20 for a long soak run)."""


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


# -- databases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """A migrated database, and the event loop (kept for the module) its engine lives in."""

    url: str
    engine: AsyncEngine = field(repr=False)
    runner: asyncio.Runner = field(repr=False)

    def run(self, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run one example's async body (hypothesis calls the test synchronously)."""
        self.runner.run(body())


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    """SQLite or the test PostgreSQL, migrated once; each example empties it first.

    Module-scoped (hypothesis examples cannot use function-scoped fixtures), with
    one event loop and one engine for all examples, as the daemon keeps them.
    """
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('convergence') / 'refreshd.db'}"
    else:
        url = request.getfixturevalue("pg_database")
    with migrated(url) as database:
        yield database


@contextmanager
def migrated(url: str) -> Iterator[Database]:
    """The database at ``url`` migrated, with its own event loop and engine."""
    with asyncio.Runner() as runner:
        engine = create_engine(url)
        try:
            runner.run(upgrade(engine))
            yield Database(url, engine, runner)
        finally:
            runner.run(engine.dispose())


async def empty_database(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        for table in reversed(schema.metadata.sorted_tables):
            await conn.execute(table.delete())


# -- the cloud side: operations drawn by hypothesis -------------------------------------------


class World:
    """The cloud under test, and the ids it ever had or may have (to re-create or dangle refs).

    Besides its objects, a vm may refer to an object the cloud deleted or to one it
    does not have yet (``FUTURE`` ids, which a later create may bring): the daemon
    then keeps a skeletal row (DESIGN.md semantics 4) until a refresh fills it in.
    """

    FUTURE = {
        "flavors": ("flavor-91", "flavor-92"),
        "images": ("image-91", "image-92"),
        "security_groups": ("sg-91", "sg-92"),
        "vms": (),
    }

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud
        self.ever: dict[str, set[str]] = {c: set(cloud.ids(c)) for c in (*REFERENCED, "vms")}

    def absent(self, collection: str) -> list[str]:
        """Ids the cloud does not have: the future ones it never had first, then deleted ones."""
        present = set(self.cloud.ids(collection))
        future = [i for i in self.FUTURE[collection] if i not in present | self.ever[collection]]
        return future + sorted(self.ever[collection] - present)

    def pick(self, collection: str, index: int) -> str | None:
        """An existing object of ``collection`` (None when there is none)."""
        ids = self.cloud.ids(collection)
        return ids[index % len(ids)] if ids else None

    def pick_ref(self, collection: str, index: int | None) -> str | None:
        """A reference for a vm: an existing object (``index >= 0``), or one the cloud
        does not have (``index < 0``), or None."""
        if index is None:
            return None
        candidates = self.cloud.ids(collection) if index >= 0 else self.absent(collection)
        return candidates[index % len(candidates)] if candidates else None

    def dangling(self) -> list[tuple[str, str]]:
        """``(collection, id)`` of the objects vms refer to that the cloud does not have:
        those it never had first (the daemon holds skeletal rows for them), then deleted ones.
        """
        snap = self.cloud.snapshot()
        refs: set[tuple[str, str]] = set()
        for vm in snap["vms"].values():
            refs.update(("flavors", r) for r in [vm.get("flavor_id")] if r)
            refs.update(("images", r) for r in [vm.get("image_id")] if r)
            refs.update(("security_groups", r) for r in vm.get("security_group_ids") or ())
        missing = [(c, r) for c, r in sorted(refs) if r not in snap[c]]
        return sorted(missing, key=lambda cr: cr[1] in self.ever[cr[0]])

    def reuse(self, collection: str, index: int | None) -> dict[str, str]:
        """``{"id": <an absent id>}`` to (re-)create that object, or ``{}`` for a new id."""
        gone = self.absent(collection)
        return {"id": gone[index % len(gone)]} if index is not None and gone else {}

    def settle(self) -> None:
        for collection, ids in self.ever.items():
            ids.update(self.cloud.ids(collection))


def _groups(world: World, picks: Iterable[int]) -> list[str]:
    out: list[str] = []
    for index in picks:
        ref = world.pick_ref("security_groups", index)
        if ref is not None and ref not in out:
            out.append(ref)
    return out


def _disks(disks: Iterable[tuple[int, int]]) -> list[dict[str, Any]]:
    return [{"device_name": DEVICES[i], "size_gb": size} for i, size in disks]


@dataclass(frozen=True)
class CreateVm:
    reuse: int | None
    name: str
    state: str
    flavor: int | None
    image: int | None
    groups: tuple[int, ...]
    tags: dict[str, str]
    disks: tuple[tuple[int, int], ...]
    ports: int

    def apply(self, w: World) -> str:
        fields = {
            **w.reuse("vms", self.reuse),
            "name": self.name,
            "state": self.state,
            "flavor_id": w.pick_ref("flavors", self.flavor),
            "image_id": w.pick_ref("images", self.image),
            "security_group_ids": _groups(w, self.groups),
            "tags": dict(self.tags),
            "disks": _disks(self.disks),
            "ports": [{} for _ in range(self.ports)],
            "zone": "az-1",
        }
        vm = w.cloud.create("vms", fields)
        return f"create vm {vm['id']}: {fields}"


@dataclass(frozen=True)
class UpdateVm:
    vm: int
    changes: dict[str, Any]

    def apply(self, w: World) -> str:
        vm_id = w.pick("vms", self.vm)
        if vm_id is None:
            return "update vm: no vm"
        vm = w.cloud.get("vms", vm_id)
        assert vm is not None
        fields: dict[str, Any] = {}
        for key, value in self.changes.items():
            if key in ("name", "state"):
                fields[key] = value
            elif key == "tags":
                fields["tags"] = dict(value)
            elif key in ("flavor", "image"):
                fields[f"{key}_id"] = w.pick_ref(f"{key}s", value)
            elif key == "groups":
                fields["security_group_ids"] = _groups(w, value)
            elif key == "disks":
                fields["disks"] = _disks(value)
            elif key == "ports":
                actions, new = value
                ports = []
                for i, port in enumerate(vm["ports"]):
                    action = actions[i] if i < len(actions) else "keep"
                    if action == "keep":
                        ports.append(port)
                    elif action != "drop":
                        ports.append({**port, "ip": f"192.168.7.{action}"})
                fields["ports"] = ports + [{} for _ in range(new)]
        w.cloud.update("vms", vm_id, fields)
        return f"update vm {vm_id}: {fields}"


@dataclass(frozen=True)
class DeleteVm:
    vm: int

    def apply(self, w: World) -> str:
        vm_id = w.pick("vms", self.vm)
        if vm_id is None:
            return "delete vm: no vm"
        w.cloud.delete("vms", vm_id)
        return f"delete vm {vm_id}"


@dataclass(frozen=True)
class CreateObject:
    collection: str
    reuse: int | None
    fields: dict[str, Any]

    def apply(self, w: World) -> str:
        obj = w.cloud.create(
            self.collection, {**w.reuse(self.collection, self.reuse), **self.fields}
        )
        return f"create {self.collection} {obj['id']}: {self.fields}"


@dataclass(frozen=True)
class UpdateObject:
    collection: str
    pick: int
    fields: dict[str, Any]

    def apply(self, w: World) -> str:
        obj_id = w.pick(self.collection, self.pick)
        if obj_id is None:
            return f"update {self.collection}: none"
        w.cloud.update(self.collection, obj_id, self.fields)
        return f"update {self.collection} {obj_id}: {self.fields}"


@dataclass(frozen=True)
class DeleteObject:
    collection: str
    pick: int

    def apply(self, w: World) -> str:
        obj_id = w.pick(self.collection, self.pick)
        if obj_id is None:
            return f"delete {self.collection}: none"
        w.cloud.delete(self.collection, obj_id)
        return f"delete {self.collection} {obj_id} (vms may still refer to it)"


@dataclass(frozen=True)
class CreateMissing:
    """Create an object that vms already refer to (never there yet, or deleted before)."""

    pick: int
    fields: dict[str, Any]

    def apply(self, w: World) -> str:
        missing = w.dangling()
        if not missing:
            return "create missing: nothing is missing"
        collection, obj_id = missing[self.pick % len(missing)]
        w.cloud.create(collection, {"id": obj_id, **self.fields})
        return f"create missing {collection} {obj_id}: {self.fields}"


@dataclass(frozen=True)
class Churn:
    seed: int
    n: int

    def apply(self, w: World) -> str:
        events = w.cloud.churn(Random(self.seed), self.n)
        return f"churn {self.n}: " + ", ".join(f"{e['type'][17:]} {e['subject']}" for e in events)


Operation = (
    CreateVm
    | UpdateVm
    | DeleteVm
    | CreateObject
    | UpdateObject
    | DeleteObject
    | CreateMissing
    | Churn
)

names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
    min_size=1,
    max_size=10,
)
picks = st.integers(0, 40)
ref_picks = st.none() | picks | st.integers(0, 4).map(lambda i: -1 - i)
"""None, an existing object, or (negative) one the cloud does not have (never had, mostly)."""
tags = st.dictionaries(
    st.sampled_from(["env", "team", "app", "owner"]),
    st.sampled_from(["prod", "dev", "alpha"]) | names,
    max_size=3,
)
disks = st.lists(
    st.tuples(st.integers(0, len(DEVICES) - 1), st.sampled_from(DISK_SIZES)),
    max_size=3,
    unique_by=lambda d: d[0],
).map(tuple)
port_changes = st.tuples(
    st.lists(st.sampled_from(["keep", "drop"]) | st.integers(1, 254), max_size=3).map(tuple),
    st.integers(0, 2),
)
vm_states = st.sampled_from(VM_STATES)
object_fields = {
    "flavors": {
        "name": names,
        "cpus": st.integers(1, 64),
        "memory_mb": st.integers(0, 1 << 20),
        "disk_gb": st.integers(0, 500),
        "description": names,
    },
    "images": {
        "name": names,
        "os": st.sampled_from(OPERATING_SYSTEMS) | names,
        "size_gb": st.integers(0, 100),
        "description": names,
    },
    "security_groups": {"name": names, "description": names},
}

create_vm = st.builds(
    CreateVm,
    reuse=st.none() | picks,
    name=names,
    state=vm_states,
    flavor=ref_picks,
    image=ref_picks,
    groups=st.lists(picks, max_size=3).map(tuple),
    tags=tags,
    disks=disks,
    ports=st.integers(0, 2),
)
update_vm = st.builds(
    UpdateVm,
    vm=picks,
    changes=st.fixed_dictionaries(
        {},
        optional={
            "name": names,
            "state": vm_states,
            "flavor": ref_picks,
            "image": ref_picks,
            "groups": st.lists(picks, max_size=3).map(tuple),
            "tags": tags,
            "disks": disks,
            "ports": port_changes,
        },
    ),
)
delete_vm = st.builds(DeleteVm, vm=picks)


def _object_ops(collection: str) -> st.SearchStrategy[Operation]:
    spec = object_fields[collection]
    return st.one_of(
        st.builds(
            CreateObject,
            collection=st.just(collection),
            reuse=st.none() | picks,
            fields=st.fixed_dictionaries(
                {"name": spec["name"]}, optional={k: v for k, v in spec.items() if k != "name"}
            ),
        ),
        st.builds(
            UpdateObject,
            collection=st.just(collection),
            pick=picks,
            fields=st.fixed_dictionaries({}, optional=spec),
        ),
        st.builds(DeleteObject, collection=st.just(collection), pick=picks),
    )


object_ops = st.one_of(*(_object_ops(c) for c in REFERENCED))
create_missing = st.builds(CreateMissing, pick=picks, fields=st.fixed_dictionaries({"name": names}))
churn = st.builds(Churn, seed=st.integers(0, 1 << 16), n=st.integers(1, 8))
_WEIGHTED: dict[str, tuple[int, st.SearchStrategy[Operation]]] = {
    "update vm": (3, update_vm),
    "create vm": (2, create_vm),
    "delete vm": (1, delete_vm),
    "flavor/image/group": (2, object_ops),
    "create missing": (1, create_missing),
    "churn": (1, churn),
}
operations: st.SearchStrategy[Operation] = st.sampled_from(
    [kind for kind, (weight, _) in _WEIGHTED.items() for _ in range(weight)]
).flatmap(lambda kind: _WEIGHTED[kind][1])
"""One cloud change; kinds weighted (``one_of`` would give each of the 9 flavor/image/group
operations as much weight as a vm update)."""
seeds = st.integers(0, 1 << 16)


# -- the daemon side ----------------------------------------------------------------------------


def targets_of(events: Iterable[CloudEvent]) -> list[Target]:
    return [target for event in events for target in map_event(MANAGER, event)]


@dataclass
class Harness:
    """One example's cloud, database and refresher."""

    engine: AsyncEngine
    refresher: Refresher
    world: World
    neighbour: Cloud | None = None
    """The cloud of manager NEIGHBOUR (same seed, so the same ids), when asked for."""

    @property
    def cloud(self) -> Cloud:
        return self.world.cloud

    def apply(self, op: Operation) -> list[CloudEvent]:
        """Apply ``op`` to the cloud; the events it emitted."""
        before = self.cloud.last_sequence
        what = op.apply(self.world)
        self.world.settle()
        _note(f"cloud: {what}")
        return self.cloud.events_after(before, limit=100_000).events

    async def full(self) -> RefreshResult:
        result = await self.refresher.refresh(TargetCollection(MANAGER, [Target.full(MANAGER)]))
        _note(f"full refresh: {result.details()}")
        _count_events("full", result)
        return result

    async def targeted(self, targets: Iterable[Target]) -> RefreshResult:
        batch = TargetCollection(MANAGER, targets)
        assert batch and not batch.is_full
        result = await self.refresher.refresh(batch)
        refs = sorted(f"{t.association}:{t.manager_ref['ems_ref']}" for t in batch)
        _note(f"targeted refresh of {refs}: {result.details()}")
        _count_events("targeted", result)
        return result

    async def assert_converged(self, context: str, *, allow_skeletal: bool = False) -> None:
        await assert_database_equals_cloud(
            self.engine, MANAGER, self.cloud, context=context, allow_skeletal=allow_skeletal
        )
        if self.neighbour is not None:
            await assert_database_equals_cloud(
                self.engine, NEIGHBOUR, self.neighbour, context=f"{context}, other manager"
            )


def _note(message: str) -> None:
    """Printed with a falsifying example (a no-op outside hypothesis)."""
    if currently_in_test_context():
        note(message)


def _count_events(kind: str, result: RefreshResult) -> None:
    """What the refreshes did, for ``--hypothesis-show-statistics``."""
    if not currently_in_test_context():
        return
    for collection, counts in result.details().items():
        for what in counts:
            event(f"{kind} refresh {what} {collection}")


@asynccontextmanager
async def harness(
    db: Database, *, vms: int, seed: int, neighbour: bool = False
) -> AsyncIterator[Harness]:
    """A cloud of ``vms`` vms served by an embedded simulator, and an empty database.

    ``neighbour``: also manager NEIGHBOUR, a still cloud with the same ids, fully
    refreshed first: refreshes of MANAGER must never touch its rows.
    """
    engine = db.engine
    await empty_database(engine)
    provider = {
        "provider": PROVIDER,
        "endpoint": "embedded",
        "embedded_vms": vms,
        "embedded_seed": seed,
        "page_size": 7,  # several pages per collection in a full refresh
        "ids_per_request": 3,  # several requests per collection in a targeted refresh
    }
    names = (MANAGER, NEIGHBOUR) if neighbour else (MANAGER,)
    loaded = parse_config(
        {
            # the mass-deletion guard is not under test here: a small cloud may lose most of
            # its vms
            "persister": {"max_delete_ratio": 1.0},
            "managers": [{"name": name, **provider} for name in names],
        }
    )
    async with assemble(loaded, engine=engine) as parts:
        clouds: dict[str, Cloud] = {}
        for name in names:
            connection = parts.connection(name)
            assert isinstance(connection, AwesomeConnection) and connection.cloud is not None
            clouds[name] = connection.cloud
        refresher = parts.refresher
        if neighbour:
            await refresher.refresh(TargetCollection(NEIGHBOUR, [Target.full(NEIGHBOUR)]))
        yield Harness(engine, refresher, World(clouds[MANAGER]), clouds.get(NEIGHBOUR))


# -- 1. every event delivered -----------------------------------------------------------------


@settings(COMMON, max_examples=examples(25))
@given(vms=st.integers(0, 12), seed=seeds, ops=st.lists(operations, max_size=12))
def test_targeted_refreshes_of_every_event_keep_the_database_equal_to_the_cloud(
    database: Database, vms: int, seed: int, ops: list[Operation]
) -> None:
    async def body() -> None:
        async with harness(database, vms=vms, seed=seed) as h:
            await h.full()
            await h.assert_converged("after the first full refresh")
            for step, op in enumerate(ops, 1):
                targets = targets_of(h.apply(op))
                if targets:  # an operation with nothing to act on is skipped
                    await h.targeted(targets)
                # a vm may refer to an object the cloud does not have: only a full
                # refresh archives its skeletal row
                await h.assert_converged(f"after step {step}: {op}", allow_skeletal=True)

    database.run(body)


# -- 2. dropped events ----------------------------------------------------------------------------


@settings(COMMON, max_examples=examples(20))
@given(
    vms=st.integers(0, 12),
    seed=seeds,
    ops=st.lists(operations, min_size=1, max_size=10),
    data=st.data(),
)
def test_a_full_refresh_restores_equality_after_dropped_events(
    database: Database, vms: int, seed: int, ops: list[Operation], data: st.DataObject
) -> None:
    async def body() -> None:
        async with harness(database, vms=vms, seed=seed, neighbour=True) as h:
            await h.full()
            for step, op in enumerate(ops, 1):
                events = h.apply(op)
                delivered = data.draw(
                    st.lists(st.booleans(), min_size=len(events), max_size=len(events)),
                    label=f"step {step}: events delivered",
                )
                targets = targets_of(e for e, ok in zip(events, delivered, strict=True) if ok)
                if targets:
                    await h.targeted(targets)
            if data.draw(st.booleans(), label="what vms refer to appears, events lost"):
                # the skeletal rows of references that came before their object (and the
                # archived rows of objects that come back) are the full refresh's to fill in
                for step, _ in enumerate(h.world.dangling(), len(ops) + 1):
                    h.apply(CreateMissing(0, {"name": f"late {step}"}))
            await h.full()
            await h.assert_converged("after the full refresh that follows the dropped events")

    database.run(body)


# -- 3. scope of a targeted refresh -------------------------------------------------------------


async def all_rows(engine: AsyncEngine) -> dict[str, dict[int, dict[str, Any]]]:
    """Every row of every inventory table, all columns, by table and id."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    async with engine.connect() as conn:
        for name in (*REFERENCED, "vms", "disks", "network_ports", "vm_security_groups"):
            table = schema.metadata.tables[name]
            rows = (await conn.execute(select(table))).mappings().all()
            out[name] = {row["id"]: dict(row) for row in rows}
    return out


def _differences(table: str, before: dict[int, Any], after: dict[int, Any]) -> list[str]:
    lines = [f"{table} id {i} removed: {before[i]}" for i in sorted(before.keys() - after.keys())]
    lines += [f"{table} id {i} added: {after[i]}" for i in sorted(after.keys() - before.keys())]
    lines += [
        f"{table} id {i} changed:\n  before {before[i]}\n  after  {after[i]}"
        for i in sorted(before.keys() & after.keys())
        if before[i] != after[i]
    ]
    return lines


@settings(COMMON, max_examples=examples(20))
@given(
    vms=st.integers(3, 12),
    seed=seeds,
    ops=st.lists(operations, min_size=1, max_size=10),
    data=st.data(),
)
def test_a_targeted_refresh_never_changes_a_row_outside_its_scope(
    database: Database, vms: int, seed: int, ops: list[Operation], data: st.DataObject
) -> None:
    async def body() -> None:
        async with harness(database, vms=vms, seed=seed, neighbour=True) as h:
            await h.full()
            # a stretch of the event stream, and a batch made of some of its targets
            events = [e for op in ops for e in h.apply(op)]
            touched = sorted(
                {(t.association, t.manager_ref["ems_ref"]) for t in targets_of(events)}
            )
            if not touched:
                return  # the operations had nothing to act on
            chosen = data.draw(
                st.lists(st.sampled_from(touched), min_size=1, unique=True),
                label="targets of the batch",
            )
            targeted = {c: {ref for a, ref in chosen if a == c} for c in (*REFERENCED, "vms")}
            # the cloud also changes outside the batch: other vms lose their children or go
            for vm_id in h.cloud.ids("vms"):
                if vm_id in targeted["vms"]:
                    continue
                change = data.draw(
                    st.sampled_from(["none", "strip", "delete"]), label=f"change {vm_id}"
                )
                if change == "strip":
                    h.cloud.update(
                        "vms",
                        vm_id,
                        {"name": "stripped", "disks": [], "ports": [], "security_group_ids": []},
                    )
                elif change == "delete":
                    h.cloud.delete("vms", vm_id)
            for collection in REFERENCED:
                for obj_id in h.cloud.ids(collection):
                    if obj_id in targeted[collection]:
                        continue
                    change = data.draw(
                        st.sampled_from(["none", "rename", "delete"]), label=f"change {obj_id}"
                    )
                    if change == "rename":
                        h.cloud.update(collection, obj_id, {"name": f"{obj_id} renamed"})
                    elif change == "delete":
                        h.cloud.delete(collection, obj_id)
            expected = cloud_state(h.cloud)
            # what the targeted vms refer to now: may be upserted (never archived)
            referred: dict[str, set[str | None]] = {c: set() for c in REFERENCED}
            for vm_id in targeted["vms"]:
                vm = expected["vms"].get(vm_id)
                if vm is not None:
                    referred["flavors"].add(vm["flavor"])
                    referred["images"].add(vm["image"])
            for vm_id, group in expected["vm_security_groups"]:
                if vm_id in targeted["vms"]:
                    referred["security_groups"].add(group)

            before = await all_rows(h.engine)
            await h.targeted(Target.of(MANAGER, a, ref) for a, ref in chosen)
            after = await all_rows(h.engine)

            async with h.engine.connect() as conn:
                m1 = (
                    await conn.execute(
                        select(schema.managers.c.id).where(schema.managers.c.name == MANAGER)
                    )
                ).scalar_one()
            vm_refs = {
                i: row["ems_ref"] for rows in (before, after) for i, row in rows["vms"].items()
            }

            def in_scope(table: str, row: dict[str, Any]) -> bool:
                """May this row change? (Referred objects may be upserted, not archived.)"""
                if row["manager_id"] != m1:
                    return False  # another manager, with the same ids
                if table == "vms":
                    return row["ems_ref"] in targeted["vms"]
                if table in REFERENCED:
                    return row["ems_ref"] in targeted[table] | referred[table]
                return vm_refs[row["vm_id"]] in targeted["vms"]  # a child

            problems: list[str] = []
            for table in before:
                problems += _differences(
                    table,
                    {i: r for i, r in before[table].items() if not in_scope(table, r)},
                    {i: r for i, r in after[table].items() if not in_scope(table, r)},
                )
            for c in REFERENCED:  # referred to, not targeted: upserted at most, never archived
                for i, row in after[c].items():
                    was = before[c].get(i)
                    if (
                        row["manager_id"] == m1
                        and row["ems_ref"] in referred[c]
                        and row["ems_ref"] not in targeted[c]
                        and row["archived_at"] is not None
                        and (was is None or was["archived_at"] is None)
                    ):
                        problems.append(f"{c} {row['ems_ref']} archived by a targeted refresh")
            assert not problems, "rows outside the scope changed:\n" + "\n".join(problems)

            # ... and inside the scope the database now has what the cloud has
            stored = await database_state(h.engine, MANAGER)
            inside = diff_states(
                only_vms(stored, targeted["vms"]), only_vms(expected, targeted["vms"])
            )
            for c in REFERENCED:
                refs = targeted[c] | (referred[c] & expected[c].keys())
                inside += diff_states(
                    {c: {k: v for k, v in stored[c].items() if k in refs}},
                    {c: {k: v for k, v in expected[c].items() if k in refs}},
                )
            assert not inside, "targeted objects differ from the cloud:\n" + "\n".join(inside)

    database.run(body)


# -- 4. idempotence -------------------------------------------------------------------------------


@settings(COMMON, max_examples=examples(15))
@given(vms=st.integers(0, 12), seed=seeds, ops=st.lists(operations, max_size=10))
def test_refreshing_again_writes_nothing(
    database: Database, vms: int, seed: int, ops: list[Operation]
) -> None:
    async def body() -> None:
        async with harness(database, vms=vms, seed=seed) as h:
            await h.full()
            again = await h.full()
            assert again.rows_written == 0, f"second full refresh wrote {again.details()}"
            touched: list[Target] = []
            for step, op in enumerate(ops, 1):
                targets = targets_of(h.apply(op))
                if not targets:
                    continue
                touched += targets
                await h.targeted(targets)
                again = await h.targeted(targets)
                assert again.rows_written == 0, (
                    f"step {step}: the same targeted refresh again wrote {again.details()}"
                )
            # targeted refreshes of every event converged: a full refresh only archives
            # the skeletal rows of references to objects the cloud does not have
            skeletal = skeletal_refs(await database_state(h.engine, MANAGER))
            dangling = sum(len(refs) for refs in skeletal.values())
            converged = await h.full()
            assert converged.rows_written == converged.total.archived == dangling, (
                f"after targeted refreshes of every event, a full refresh wrote "
                f"{converged.details()}; expected only the skeletal rows {skeletal} archived"
            )
            again = await h.full()
            assert again.rows_written == 0, f"second full refresh wrote {again.details()}"
            if touched:
                redelivered = await h.targeted(touched)
                assert redelivered.rows_written == 0, (
                    f"re-delivered events wrote {redelivered.details()}"
                )
            await h.assert_converged("after the repeated refreshes")

    database.run(body)


# -- the helper itself -----------------------------------------------------------------------------


def test_the_comparison_reports_every_kind_of_difference(database: Database) -> None:
    """tests/cloud_state.py is the oracle of the tests above: it must see what it claims to."""

    async def body() -> None:
        async with harness(database, vms=2, seed=3) as h:
            await h.full()
            await h.assert_converged("after a full refresh")
            vm = h.cloud.ids("vms")[0]
            vm_object = h.cloud.get("vms", vm)
            assert vm_object is not None and vm_object["disks"]
            disk = vm_object["disks"][0]["device_name"]
            async with h.engine.begin() as conn:
                vms, disks, flavors, images = (
                    schema.metadata.tables[t] for t in ("vms", "disks", "flavors", "images")
                )
                vm_id = (await conn.execute(select(vms.c.id).where(vms.c.ems_ref == vm))).scalar()
                await conn.execute(vms.update().where(vms.c.id == vm_id).values(tags={"x": "y"}))
                await conn.execute(
                    disks.delete().where(disks.c.vm_id == vm_id, disks.c.device_name == disk)
                )
                when = (await conn.execute(select(vms.c.created_at))).scalars().first()
                await conn.execute(
                    flavors.update()
                    .where(flavors.c.ems_ref == "flavor-01")
                    .values(archived_at=when)
                )
                m1 = (await conn.execute(select(vms.c.manager_id))).scalars().first()
                await conn.execute(
                    images.insert().values(
                        manager_id=m1, ems_ref="image-77", created_at=when, updated_at=when
                    )
                )
            lines = diff_states(await database_state(h.engine, MANAGER), cloud_state(h.cloud))
            text = "\n".join(lines)
            assert f"differs:        {vm}.tags: db={{'x': 'y'}}" in text, text
            assert f"missing in db:  {vm}/{disk} " in text, text
            assert "missing in db:  flavor-01 " in text, text
            assert "not in cloud:   image-77 " in text, text
            assert len([line for line in lines if line.startswith("  ")]) == 4, text
            with pytest.raises(AssertionError, match="image-77"):
                await h.assert_converged("tampered")
            with pytest.raises(AssertionError) as failure:
                await h.assert_converged("tampered", allow_skeletal=True)
            assert "image-77" not in str(failure.value) and "flavor-01" in str(failure.value)

    database.run(body)
