"""AwesomeCloud API objects -> inventory rows.

Flow: collector -> client -> **parser** -> InventoryPage -> persister.

Pure functions, used alike by full and targeted refreshes, producing rows in
exactly the shapes of ``daemon.model.inventory``:

=====================  ==========================================================
flavors                ems_ref, name, cpus, memory_mb, extra
images                 ems_ref, name, os, extra
security_groups        ems_ref, name, extra
vms                    ems_ref, name, state, flavor, image, tags, extra
disks                  vm, device_name, size_gb, extra
network_ports          vm, ems_ref, mac_address, ip_address, extra
vm_security_groups     vm, security_group
=====================  ==========================================================

``extra`` holds the object's other fields (``created_at``, ``description``,
``zone``...) as a JSON-able dict, or None when there are none.  References
hold the ems_ref of the object referred to.  Guarantees: a page of vms always
carries all four vm collections (possibly empty lists), so a vm that lost its
last disk gets its disks destroyed; children are unique by their key within
their vm (duplicates are dropped: the persister's upsert could not take them);
an object without a usable id is skipped with a warning, and one the parser
cannot read (an exception) is reported in ``InventoryPage.rejected``, never
raised on, so one bad object cannot block every refresh.  A page of vms
declares that it covers their child collections (``InventoryPage.covers``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from daemon.api import InventoryPage, Rejection, RejectReason, Row

log = logging.getLogger(__name__)

ApiObject = Mapping[str, Any]

VM_CHILDREN = ("disks", "network_ports", "vm_security_groups")
"""The child collections a page of vms carries."""

_FLAVOR_FIELDS = frozenset({"id", "name", "cpus", "memory_mb"})
_IMAGE_FIELDS = frozenset({"id", "name", "os"})
_GROUP_FIELDS = frozenset({"id", "name"})
_VM_FIELDS = frozenset(
    {"id", "name", "state", "flavor_id", "image_id", "tags", "disks", "ports", "security_group_ids"}
)
_DISK_FIELDS = frozenset({"device_name", "size_gb"})
_PORT_FIELDS = frozenset({"id", "mac", "ip"})


def _extra(obj: ApiObject, consumed: frozenset[str]) -> dict[str, Any] | None:
    if obj.keys() <= consumed:
        return None
    return {k: v for k, v in obj.items() if k not in consumed}


def _key(value: Any) -> str | None:
    """An identifier: a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    if type(value) is int:
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _ref(obj: ApiObject, kind: str) -> str | None:
    ref = _key(obj.get("id"))
    if ref is None:
        log.warning("skipping %s without a usable id: %.200r", kind, obj)
    return ref


def parse_flavor(obj: ApiObject) -> Row | None:
    ref = _ref(obj, "flavor")
    if ref is None:
        return None
    return {
        "ems_ref": ref,
        "name": _str(obj.get("name")),
        "cpus": _int(obj.get("cpus")),
        "memory_mb": _int(obj.get("memory_mb")),
        "extra": _extra(obj, _FLAVOR_FIELDS),
    }


def parse_image(obj: ApiObject) -> Row | None:
    ref = _ref(obj, "image")
    if ref is None:
        return None
    return {
        "ems_ref": ref,
        "name": _str(obj.get("name")),
        "os": _str(obj.get("os")),
        "extra": _extra(obj, _IMAGE_FIELDS),
    }


def parse_security_group(obj: ApiObject) -> Row | None:
    ref = _ref(obj, "security group")
    if ref is None:
        return None
    return {"ems_ref": ref, "name": _str(obj.get("name")), "extra": _extra(obj, _GROUP_FIELDS)}


def parse_vm(obj: ApiObject) -> Row | None:
    """The vm's own row (its children come from :func:`parse_vm_children`)."""
    ref = _ref(obj, "vm")
    if ref is None:
        return None
    tags = obj.get("tags")
    return {
        "ems_ref": ref,
        "name": _str(obj.get("name")),
        "state": _str(obj.get("state")),
        "flavor": _key(obj.get("flavor_id")),
        "image": _key(obj.get("image_id")),
        "tags": dict(tags) if type(tags) is dict else None,
        "extra": _extra(obj, _VM_FIELDS),
    }


def parse_vm_children(vm_ref: str, obj: ApiObject) -> dict[str, list[Row]]:
    """Rows of the vm's disks, network ports and security group links, unique by key."""
    rows: dict[str, list[Row]] = {c: [] for c in VM_CHILDREN}
    _add_children(vm_ref, obj, rows["disks"], rows["network_ports"], rows["vm_security_groups"])
    return rows


def _add_children(
    vm_ref: str, obj: ApiObject, disks: list[Row], ports: list[Row], links: list[Row]
) -> None:
    # The hot loop of a full refresh (several children per vm): plain dict checks only.
    for name, disk in _unique(obj.get("disks"), "device_name"):
        disks.append(
            {
                "vm": vm_ref,
                "device_name": name,
                "size_gb": _int(disk.get("size_gb")),
                "extra": _extra(disk, _DISK_FIELDS),
            }
        )
    for port_ref, port in _unique(obj.get("ports"), "id"):
        ports.append(
            {
                "vm": vm_ref,
                "ems_ref": port_ref,
                "mac_address": _str(port.get("mac")),
                "ip_address": _str(port.get("ip")),
                "extra": _extra(port, _PORT_FIELDS),
            }
        )
    for group, _ in _unique(obj.get("security_group_ids"), None):
        links.append({"vm": vm_ref, "security_group": group})


def _unique(value: Any, key: str | None) -> Iterator[tuple[str, Any]]:
    """``(key, item)`` of the items of the list ``value`` whose key is new and non-empty.

    With a ``key``, the items are dicts keyed by that field (other items are
    skipped); without one, the items are the keys themselves.  Anything but a
    list yields nothing.
    """
    if type(value) is not list:
        return
    seen: set[str] = set()
    for item in value:
        if key is None:
            ref = item
        elif type(item) is dict:
            ref = item.get(key)
        else:
            continue
        if type(ref) is str and ref and ref not in seen:
            seen.add(ref)
            yield ref, item


PARSERS: dict[str, Callable[[ApiObject], Row | None]] = {
    "flavors": parse_flavor,
    "images": parse_image,
    "security_groups": parse_security_group,
}
"""Parsers of the top-level collections without children."""


def parse_vms(objects: Iterable[ApiObject]) -> InventoryPage:
    """A page of vms with their disks, network ports and security group links."""
    rows: dict[str, list[Row]] = {
        "vms": [],
        "disks": [],
        "network_ports": [],
        "vm_security_groups": [],
    }
    vms, disks, ports, links = (rows[c] for c in ("vms", *VM_CHILDREN))
    page = InventoryPage(rows, covers=frozenset(VM_CHILDREN))
    seen: set[str] = set()
    for obj in objects:
        try:
            row = parse_vm(obj)
            if row is None or row["ems_ref"] in seen:
                continue
            children: dict[str, list[Row]] = {c: [] for c in VM_CHILDREN}
            _add_children(row["ems_ref"], obj, *children.values())
        except PARSE_ERRORS as exc:
            _reject(page, "vms", obj, exc)
            continue
        seen.add(row["ems_ref"])
        vms.append(row)
        disks.extend(children["disks"])
        ports.extend(children["network_ports"])
        links.extend(children["vm_security_groups"])
    return page


PARSE_ERRORS = (AttributeError, KeyError, TypeError, ValueError)
"""What a malformed object raises in a parser: it is rejected alone (DESIGN.md semantic 13)."""


def _reject(page: InventoryPage, collection: str, obj: ApiObject, exc: Exception) -> None:
    ref = obj.get("id") if isinstance(obj, Mapping) else None
    error = f"{type(exc).__name__}: {exc}"
    if isinstance(ref, str) and ref:
        page.rejected.append(Rejection(collection, ref, RejectReason.PARSE_ERROR, error))
    else:
        log.warning("skipping a malformed %s without a usable id: %s", collection, error)


def parse_page(collection: str, objects: Iterable[ApiObject]) -> InventoryPage:
    """Objects of one API collection as an InventoryPage (vms bring their children)."""
    if collection == "vms":
        return parse_vms(objects)
    parse = PARSERS[collection]
    rows: list[Row] = []
    page = InventoryPage({collection: rows})
    seen: set[str] = set()
    for obj in objects:
        try:
            row = parse(obj)
        except PARSE_ERRORS as exc:
            _reject(page, collection, obj, exc)
            continue
        if row is not None and row["ems_ref"] not in seen:
            seen.add(row["ems_ref"])
            rows.append(row)
    return page
