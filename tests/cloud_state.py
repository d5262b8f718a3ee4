"""Comparable views of the inventory: what the database holds vs. what the cloud has.

Used by the convergence tests and the end-to-end tests (DESIGN.md semantics 11:
"the database equals the cloud").  The API:

* ``await database_state(engine, manager)``: the active inventory of ``manager``
  as stored (archived rows are left out);
* ``cloud_state(cloud)``: what a correct refresh of an AwesomeCloud simulator
  (:class:`providers.awesome_cloud.simulator.cloud.Cloud`) stores, derived from the
  cloud's objects independently of the parser;
* ``await assert_database_equals_cloud(engine, manager, cloud)``: both views
  must be equal; on failure the message lists, per collection, the keys only
  one side has and the fields that differ.  ``allow_skeletal=True`` tolerates
  the skeletal rows a targeted refresh leaves for references to objects the
  cloud does not have (see there);
* ``diff_states(db, cloud)``: those lines without raising (empty when equal);
  ``only_vms(state, refs)`` narrows a state to some vms and their children;
  ``is_skeletal`` / ``skeletal_refs`` recognize skeletal rows (ref only).

A *state* is ``{collection: {key: values}}`` for the seven collections of
``daemon.model.inventory``.  Keys are the cloud's identifiers:

=====================  =================================  ===============================
collection             key                                values
=====================  =================================  ===============================
flavors                ems_ref                            name, cpus, memory_mb, extra
images                 ems_ref                            name, os, extra
security_groups        ems_ref                            name, extra
vms                    ems_ref                            name, state, flavor, image,
                                                          tags, extra
disks                  (vm ems_ref, device_name)          size_gb, extra
network_ports          (vm ems_ref, port ems_ref)         mac_address, ip_address, extra
vm_security_groups     (vm ems_ref, group ems_ref)        (none: ``{}``)
=====================  =================================  ===============================

``flavor`` / ``image`` are the ems_ref of the row the foreign key points to
(whether or not that row is archived: a vm may keep referring to a flavor the
cloud deleted).  ``extra`` is every field of the API object the typed columns do
not hold (``created_at``, ``zone``, ``description``...), or None when there are
none: the parser keeps every field, so a lost one shows up here.

In the database view top-level rows with ``archived_at`` set are left out;
child rows have no archive and are all included, also those of an archived vm
(a refresh must have destroyed them, so they show up as a difference).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.persistence import schema

State = dict[str, dict[Any, dict[str, Any]]]
"""``{collection: {key: {field: value}}}``."""

COLLECTIONS = (
    "flavors",
    "images",
    "security_groups",
    "vms",
    "disks",
    "network_ports",
    "vm_security_groups",
)

# API fields that have their own column (or are the key); the rest goes to ``extra``.
_TYPED_FIELDS = {
    "flavors": frozenset({"id", "name", "cpus", "memory_mb"}),
    "images": frozenset({"id", "name", "os"}),
    "security_groups": frozenset({"id", "name"}),
    "vms": frozenset(
        {
            "id",
            "name",
            "state",
            "flavor_id",
            "image_id",
            "tags",
            "disks",
            "ports",
            "security_group_ids",
        }
    ),
    "disks": frozenset({"device_name", "size_gb"}),
    "network_ports": frozenset({"id", "mac", "ip"}),
}

_MAX_LINES_PER_COLLECTION = 25


def _extra(obj: Mapping[str, Any], typed: frozenset[str]) -> dict[str, Any] | None:
    rest = {k: v for k, v in obj.items() if k not in typed}
    return rest or None


def cloud_state(cloud: Any) -> State:
    """What a correct refresh of ``cloud`` (a simulator ``Cloud``) stores, as a state."""
    snap = cloud.snapshot()
    state: State = {c: {} for c in COLLECTIONS}
    for ref, obj in snap["flavors"].items():
        state["flavors"][ref] = {
            "name": obj.get("name"),
            "cpus": obj.get("cpus"),
            "memory_mb": obj.get("memory_mb"),
            "extra": _extra(obj, _TYPED_FIELDS["flavors"]),
        }
    for ref, obj in snap["images"].items():
        state["images"][ref] = {
            "name": obj.get("name"),
            "os": obj.get("os"),
            "extra": _extra(obj, _TYPED_FIELDS["images"]),
        }
    for ref, obj in snap["security_groups"].items():
        state["security_groups"][ref] = {
            "name": obj.get("name"),
            "extra": _extra(obj, _TYPED_FIELDS["security_groups"]),
        }
    for ref, vm in snap["vms"].items():
        state["vms"][ref] = {
            "name": vm.get("name"),
            "state": vm.get("state"),
            "flavor": vm.get("flavor_id") or None,
            "image": vm.get("image_id") or None,
            "tags": dict(vm.get("tags") or {}),
            "extra": _extra(vm, _TYPED_FIELDS["vms"]),
        }
        for disk in vm.get("disks") or ():
            state["disks"][(ref, disk["device_name"])] = {
                "size_gb": disk.get("size_gb"),
                "extra": _extra(disk, _TYPED_FIELDS["disks"]),
            }
        for port in vm.get("ports") or ():
            state["network_ports"][(ref, port["id"])] = {
                "mac_address": port.get("mac"),
                "ip_address": port.get("ip"),
                "extra": _extra(port, _TYPED_FIELDS["network_ports"]),
            }
        for group in vm.get("security_group_ids") or ():
            state["vm_security_groups"][(ref, group)] = {}
    return state


async def database_state(engine: AsyncEngine, manager: str) -> State:
    """The active inventory of ``manager`` as stored (empty when the manager is unknown)."""
    state: State = {c: {} for c in COLLECTIONS}
    async with engine.connect() as conn:
        manager_id = (
            await conn.execute(
                select(schema.managers.c.id).where(schema.managers.c.name == manager)
            )
        ).scalar_one_or_none()
        if manager_id is None:
            return state

        refs: dict[str, dict[int, str]] = {}  # table -> id -> ems_ref, archived rows included
        for name in ("flavors", "images", "security_groups", "vms"):
            t = schema.metadata.tables[name]
            rows = (await conn.execute(select(t).where(t.c.manager_id == manager_id))).all()
            refs[name] = {row.id: row.ems_ref for row in rows}
            for row in rows:
                if row.archived_at is not None:
                    continue
                values = row._mapping
                if name == "flavors":
                    fields = {k: values[k] for k in ("name", "cpus", "memory_mb", "extra")}
                elif name == "images":
                    fields = {k: values[k] for k in ("name", "os", "extra")}
                elif name == "security_groups":
                    fields = {k: values[k] for k in ("name", "extra")}
                else:
                    # flavors and images were read first: their refs are all known
                    fields = {
                        "name": row.name,
                        "state": row.state,
                        "flavor": _ref_of(refs, "flavors", row.flavor_id),
                        "image": _ref_of(refs, "images", row.image_id),
                        "tags": row.tags,
                        "extra": row.extra,
                    }
                state[name][row.ems_ref] = fields

        def vm_ref(vm_id: int) -> str:
            return refs["vms"].get(vm_id, f"<vms.id={vm_id} not of this manager>")

        d = schema.disks
        for row in await conn.execute(select(d).where(d.c.manager_id == manager_id)):
            state["disks"][(vm_ref(row.vm_id), row.device_name)] = {
                "size_gb": row.size_gb,
                "extra": row.extra,
            }
        p = schema.network_ports
        for row in await conn.execute(select(p).where(p.c.manager_id == manager_id)):
            state["network_ports"][(vm_ref(row.vm_id), row.ems_ref)] = {
                "mac_address": row.mac_address,
                "ip_address": row.ip_address,
                "extra": row.extra,
            }
        g = schema.vm_security_groups
        for row in await conn.execute(select(g).where(g.c.manager_id == manager_id)):
            group = _ref_of(refs, "security_groups", row.security_group_id)
            state["vm_security_groups"][(vm_ref(row.vm_id), group)] = {}
    return state


def _ref_of(refs: dict[str, dict[int, str]], table: str, row_id: int | None) -> str | None:
    """The ems_ref a foreign key points to (None for NULL; a marker if dangling)."""
    if row_id is None:
        return None
    return refs[table].get(row_id, f"<{table}.id={row_id} not of this manager>")


def _fmt_key(key: Any) -> str:
    return "/".join(key) if isinstance(key, tuple) else str(key)


def diff_states(database: State, cloud: State) -> list[str]:
    """Human-readable differences between two states (empty when they are equal)."""
    lines: list[str] = []
    for collection in COLLECTIONS:
        db_rows = database.get(collection, {})
        cloud_rows = cloud.get(collection, {})
        found: list[str] = []
        for key in sorted(cloud_rows.keys() - db_rows.keys(), key=repr):
            found.append(f"  missing in db:  {_fmt_key(key)} {cloud_rows[key]}")
        for key in sorted(db_rows.keys() - cloud_rows.keys(), key=repr):
            found.append(f"  not in cloud:   {_fmt_key(key)} {db_rows[key]}")
        for key in sorted(db_rows.keys() & cloud_rows.keys(), key=repr):
            db_values, cloud_values = db_rows[key], cloud_rows[key]
            for field in sorted(db_values.keys() | cloud_values.keys()):
                if db_values.get(field) != cloud_values.get(field):
                    found.append(
                        f"  differs:        {_fmt_key(key)}.{field}: "
                        f"db={db_values.get(field)!r} cloud={cloud_values.get(field)!r}"
                    )
        if found:
            lines.append(f"{collection} ({len(db_rows)} in db, {len(cloud_rows)} in cloud):")
            lines += found[:_MAX_LINES_PER_COLLECTION]
            if len(found) > _MAX_LINES_PER_COLLECTION:
                lines.append(f"  ... and {len(found) - _MAX_LINES_PER_COLLECTION} more")
    return lines


def is_skeletal(values: Mapping[str, Any]) -> bool:
    """A skeletal row: created for a reference, ref only, every value NULL (semantics 4)."""
    return all(v is None for v in values.values())


def skeletal_refs(state: State) -> dict[str, set[str]]:
    """The refs of the skeletal rows of each referable collection of a database state."""
    return {
        c: {ref for ref, values in state[c].items() if is_skeletal(values)}
        for c in ("flavors", "images", "security_groups")
    }


async def assert_database_equals_cloud(
    engine: AsyncEngine,
    manager: str,
    cloud: Any,
    *,
    context: str = "",
    allow_skeletal: bool = False,
) -> None:
    """Fail with a readable diff unless ``manager``'s stored inventory equals ``cloud``.

    ``allow_skeletal``: skeletal rows of objects the cloud does not have are not
    differences.  A targeted refresh creates one for a vm's reference to an
    object the cloud does not have (deleted, or not created yet) and, as it
    never sweeps a collection it did not target, leaves it; the next full
    refresh archives it.  A skeletal row of an object the cloud has is always a
    difference (it should have been filled in).
    """
    stored = await database_state(engine, manager)
    expected = cloud_state(cloud)
    if allow_skeletal:
        for collection, refs in skeletal_refs(stored).items():
            for ref in refs - expected[collection].keys():
                del stored[collection][ref]
    lines = diff_states(stored, expected)
    if lines:
        head = f"database != cloud for manager {manager!r}" + (f" ({context})" if context else "")
        raise AssertionError("\n".join([head, *lines]))


def only_vms(state: State, vms: Iterable[str]) -> State:
    """``state`` restricted to the vms ``vms`` and their children (top-level others dropped)."""
    keep = set(vms)
    out: State = {c: {} for c in COLLECTIONS}
    out["vms"] = {k: v for k, v in state["vms"].items() if k in keep}
    for child in ("disks", "network_ports", "vm_security_groups"):
        out[child] = {k: v for k, v in state[child].items() if k[0] in keep}
    return out
