"""Helpers for persister tests: a small in-memory cloud that builds InventoryPages,
and readers that load what the persister wrote back from the tables."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.inventory import InventoryPage, Row
from daemon.model.targets import Target, TargetCollection
from daemon.persistence import schema

MANAGER = "m1"
TOP_LEVEL = ("flavors", "images", "security_groups", "vms")
CHILDREN = ("disks", "network_ports", "vm_security_groups")
# the natural key of a child row, after its vm
CHILD_KEY = {"disks": "device_name", "network_ports": "ems_ref"}
VALUES = {
    "flavors": ("name", "cpus", "memory_mb", "extra"),
    "images": ("name", "os", "extra"),
    "security_groups": ("name", "extra"),
    "vms": ("name", "state", "flavor", "image", "tags", "extra"),
    "disks": ("size_gb", "extra"),
    "network_ports": ("mac_address", "ip_address", "extra"),
    "vm_security_groups": (),
}


@dataclass
class Cloud:
    """What the cloud has: top-level rows by ems_ref, children by vm then key."""

    flavors: dict[str, Row] = field(default_factory=dict)
    images: dict[str, Row] = field(default_factory=dict)
    security_groups: dict[str, Row] = field(default_factory=dict)
    vms: dict[str, Row] = field(default_factory=dict)
    disks: dict[str, dict[str, Row]] = field(default_factory=dict)
    network_ports: dict[str, dict[str, Row]] = field(default_factory=dict)
    vm_security_groups: dict[str, dict[str, Row]] = field(default_factory=dict)

    def copy(self) -> Cloud:
        return copy.deepcopy(self)

    def flavor(self, ref: str, name: str | None = None, cpus: int = 1, **kw: Any) -> Cloud:
        self.flavors[ref] = {"ems_ref": ref, "name": name or ref, "cpus": cpus, **kw}
        return self

    def image(self, ref: str, name: str | None = None, os: str = "linux", **kw: Any) -> Cloud:
        self.images[ref] = {"ems_ref": ref, "name": name or ref, "os": os, **kw}
        return self

    def security_group(self, ref: str, name: str | None = None) -> Cloud:
        self.security_groups[ref] = {"ems_ref": ref, "name": name or ref}
        return self

    def vm(
        self,
        ref: str,
        *,
        flavor: str | None = "f1",
        image: str | None = "img1",
        disks: Iterable[str] = ("sda",),
        ports: Iterable[str] = (),
        sgs: Iterable[str] = (),
        **values: Any,
    ) -> Cloud:
        """Add or replace vm ``ref`` with its children (ports are named ``<vm>-<port>``)."""
        base = {"ems_ref": ref, "name": ref, "state": "on", "tags": {"env": "test"}}
        self.vms[ref] = base | {"flavor": flavor, "image": image} | values
        self.disks[ref] = {d: {"vm": ref, "device_name": d, "size_gb": 10} for d in disks}
        self.network_ports[ref] = {
            f"{ref}-{p}": {"vm": ref, "ems_ref": f"{ref}-{p}", "mac_address": f"02:{p}"}
            for p in ports
        }
        self.vm_security_groups[ref] = {sg: {"vm": ref, "security_group": sg} for sg in sgs}
        return self

    def remove_vm(self, ref: str) -> Cloud:
        for coll in ("vms", *CHILDREN):
            getattr(self, coll).pop(ref, None)
        return self

    def _vm_rows(self, page: InventoryPage, refs: Iterable[str]) -> None:
        for ref in refs:
            if ref not in self.vms:
                continue  # gone from the cloud: a 404 for a targeted collector
            page.add("vms", dict(self.vms[ref]))
            for coll in CHILDREN:
                page.extend(coll, [dict(r) for r in getattr(self, coll).get(ref, {}).values()])

    def full_pages(self, vms_per_page: int = 1000) -> list[InventoryPage]:
        """What a full collector yields: the shared collections, then vms with children."""
        first = InventoryPage()
        for coll in ("flavors", "images", "security_groups"):
            first.extend(coll, [dict(r) for r in getattr(self, coll).values()])
        pages = [first]
        refs = list(self.vms)
        for i in range(0, len(refs), vms_per_page):
            page = InventoryPage()
            self._vm_rows(page, refs[i : i + vms_per_page])
            pages.append(page)
        return pages

    def targeted_page(
        self, *refs: str, with_references: bool = True, covers: Iterable[str] = CHILDREN
    ) -> InventoryPage:
        """What a targeted collector yields for vms ``refs``: the vms the cloud still has,
        their children, and (``with_references``) the flavors, images and security
        groups they refer to; the page covers the child collections ``covers``."""
        page = InventoryPage(covers=frozenset(covers))
        if with_references:
            live = [self.vms[r] for r in refs if r in self.vms]
            for coll, attr in (("flavors", "flavor"), ("images", "image")):
                wanted = {vm[attr] for vm in live}
                page.extend(coll, [dict(r) for k, r in getattr(self, coll).items() if k in wanted])
            sgs = {sg for r in refs for sg in self.vm_security_groups.get(r, {})}
            page.extend(
                "security_groups",
                [dict(r) for k, r in self.security_groups.items() if k in sgs],
            )
        self._vm_rows(page, refs)
        return page

    def normalized(self) -> dict[str, dict[Any, tuple]]:
        """The cloud in the shape :func:`normalize` gives the database."""
        out: dict[str, dict[Any, tuple]] = {}
        for coll in TOP_LEVEL:
            out[coll] = {k: _values(coll, r) for k, r in getattr(self, coll).items()}
        for coll in CHILDREN:
            out[coll] = {
                (vm, key): _values(coll, r)
                for vm, children in getattr(self, coll).items()
                for key, r in children.items()
            }
        return out


def _values(coll: str, row: Row) -> tuple:
    return tuple(row.get(a) for a in VALUES[coll])


def of_vms(norm: dict[str, dict[Any, tuple]], refs: Iterable[str]) -> dict[str, dict]:
    """The vms ``refs`` and their children of a normalized inventory."""
    refs = set(refs)
    out = {"vms": {k: v for k, v in norm["vms"].items() if k in refs}}
    for coll in CHILDREN:
        out[coll] = {k: v for k, v in norm[coll].items() if k[0] in refs}
    return out


async def pages(*items: InventoryPage) -> AsyncIterator[InventoryPage]:
    for page in items:
        yield page


def vm_targets(*refs: str, manager: str = MANAGER) -> TargetCollection:
    return TargetCollection(manager, [Target.of(manager, "vms", r) for r in refs])


async def manager_id(engine: AsyncEngine, name: str = MANAGER) -> int:
    m = schema.managers
    async with engine.connect() as conn:
        return (await conn.execute(select(m.c.id).where(m.c.name == name))).scalar_one()


async def snapshot(engine: AsyncEngine, manager: int | None = None) -> dict[str, dict[Any, dict]]:
    """Every row (all columns) of every collection table, by natural key.

    Top-level rows are keyed by ems_ref, children by ``(vm ems_ref, key)`` where key
    is the device name, the port's ems_ref or the security group's ems_ref.
    """
    out: dict[str, dict[Any, dict]] = {}
    async with engine.connect() as conn:
        for coll in TOP_LEVEL:
            t = schema.metadata.tables[coll]
            q = select(t)
            if manager is not None:
                q = q.where(t.c.manager_id == manager)
            out[coll] = {r.ems_ref: dict(r._mapping) for r in await conn.execute(q)}
        vms, sgs = schema.vms, schema.security_groups
        for coll in CHILDREN:
            t = schema.metadata.tables[coll]
            q = select(t, vms.c.ems_ref.label("vm_ref")).join(vms, vms.c.id == t.c.vm_id)
            if coll == "vm_security_groups":
                q = q.add_columns(sgs.c.ems_ref.label("sg")).join(
                    sgs, sgs.c.id == t.c.security_group_id
                )
            if manager is not None:
                q = q.where(t.c.manager_id == manager)
            rows = {}
            for r in await conn.execute(q):
                row = dict(r._mapping)
                key = row.pop("sg") if coll == "vm_security_groups" else row[CHILD_KEY[coll]]
                rows[(row.pop("vm_ref"), key)] = row
            out[coll] = rows
    return out


def normalize(snap: dict[str, dict[Any, dict]]) -> dict[str, dict[Any, tuple]]:
    """Active rows of a snapshot as the cloud would describe them (refs, not ids)."""
    ref_of = {
        coll: {r["id"]: ref for ref, r in snap[coll].items()} for coll in ("flavors", "images")
    }
    out: dict[str, dict[Any, tuple]] = {}
    for coll in TOP_LEVEL:
        rows = {}
        for ref, r in snap[coll].items():
            if r["archived_at"] is not None:
                continue
            if coll == "vms":
                r = r | {
                    "flavor": ref_of["flavors"].get(r["flavor_id"]),
                    "image": ref_of["images"].get(r["image_id"]),
                }
            rows[ref] = _values(coll, r)
        out[coll] = rows
    for coll in CHILDREN:
        out[coll] = {k: _values(coll, r) for k, r in snap[coll].items()}
    return out


async def runs(engine: AsyncEngine) -> list[dict]:
    t = schema.refresh_runs
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(select(t).order_by(t.c.id))]


async def manager_row(engine: AsyncEngine, name: str = MANAGER) -> dict:
    m = schema.managers
    async with engine.connect() as conn:
        return dict((await conn.execute(select(m).where(m.c.name == name))).one()._mapping)


def fleet(n: int) -> Cloud:
    cloud = Cloud().flavor("f1").image("img1")
    for i in range(n):
        cloud.vm(f"v{i}", disks=("sda", "sdb"), ports=("p1",))  # 4 rows per vm
    return cloud


# hypothesis: small random inventories

VMS = ["v0", "v1", "v2", "v3"]
vm_data = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y"]),
        "state": st.sampled_from(["on", "off"]),
        "flavor": st.sampled_from(["f1", "f2", "f9", None]),  # f9 is never listed
        "image": st.sampled_from(["img1", "img2", None]),
        "tags": st.dictionaries(st.sampled_from("ab"), st.integers(0, 1), max_size=2),
        "disks": st.sets(st.sampled_from(["sda", "sdb", "sdc"])),
        "ports": st.sets(st.sampled_from(["p1", "p2"])),
        "sgs": st.sets(st.sampled_from(["sg1", "sg2"])),
    }
)


def make_cloud(vms: dict[str, dict | None], names: tuple[str, str]) -> Cloud:
    cloud = Cloud().flavor("f1", name=names[0]).flavor("f2").image("img1", name=names[1])
    cloud.image("img2").security_group("sg1", name=names[0]).security_group("sg2")
    for ref, data in vms.items():
        if data is not None:
            cloud.vm(ref, **data)
    return cloud


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Cloud, Cloud, list[str]]:
    names = st.tuples(st.sampled_from(["n1", "n2"]), st.sampled_from(["n1", "n2"]))
    initial = draw(st.dictionaries(st.sampled_from(VMS), vm_data, max_size=4))
    chosen = draw(st.sets(st.sampled_from([*VMS, "new1", "new2"]), max_size=3))
    # the targeted vms' new state: None means gone from the cloud
    changes = draw(st.fixed_dictionaries({r: st.none() | vm_data for r in sorted(chosen)}))
    return make_cloud(initial, draw(names)), make_cloud(changes, draw(names)), sorted(chosen)


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait (bounded) until ``predicate`` holds, polling it."""

    async def poll() -> None:
        while not await predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)
