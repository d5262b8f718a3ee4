"""The inventory model: every collection refreshd keeps, declared once.

Flow: ... -> parser -> **inventory rows** -> persister.

A parser turns API objects into an :class:`InventoryPage`: rows (plain dicts)
per collection, with references given as the ems_ref of the object they point
to.  The shape of each row is the collection's ``staged_attributes``:

=====================  ==========================================================
collection             row attributes
=====================  ==========================================================
flavors                ems_ref, name, cpus, memory_mb, extra
images                 ems_ref, name, os, extra
security_groups        ems_ref, name, extra
vms                    ems_ref, name, state, flavor, image, tags, extra
disks                  vm, device_name, size_gb, extra
network_ports          vm, ems_ref, mac_address, ip_address, extra
vm_security_groups     vm, security_group
=====================  ==========================================================

Missing attributes are saved as NULL.  A page may hold any subset of the
collections; the persister saves them in dependency order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.model.declarations import Collection, CollectionRegistry, Reference, Retention
from daemon.model.rejection import Rejection
from daemon.model.targets import Target
from daemon.persistence import schema

Row = dict[str, Any]

COLLECTIONS = CollectionRegistry.of(
    [
        Collection(
            "flavors",
            schema.flavors,
            key=("ems_ref",),
            values=("name", "cpus", "memory_mb", "extra"),
        ),
        Collection("images", schema.images, key=("ems_ref",), values=("name", "os", "extra")),
        Collection(
            "security_groups", schema.security_groups, key=("ems_ref",), values=("name", "extra")
        ),
        Collection(
            "vms",
            schema.vms,
            key=("ems_ref",),
            values=("name", "state", "tags", "extra"),
            references=(
                Reference("flavor", "flavors", "flavor_id"),
                Reference("image", "images", "image_id"),
            ),
        ),
        Collection(
            "disks",
            schema.disks,
            key=("device_name",),
            values=("size_gb", "extra"),
            retention=Retention.DESTROY,
            parent=Reference("vm", "vms", "vm_id"),
        ),
        Collection(
            "network_ports",
            schema.network_ports,
            key=("ems_ref",),
            values=("mac_address", "ip_address", "extra"),
            retention=Retention.DESTROY,
            parent=Reference("vm", "vms", "vm_id"),
        ),
        Collection(
            "vm_security_groups",
            schema.vm_security_groups,
            key=("security_group",),
            retention=Retention.DESTROY,
            parent=Reference("vm", "vms", "vm_id"),
            references=(Reference("security_group", "security_groups", "security_group_id"),),
        ),
    ]
)


@dataclass(slots=True)
class InventoryPage:
    """Rows per collection, as one collector page parsed."""

    rows: dict[str, list[Row]] = field(default_factory=dict)
    expanded: list[Target] = field(default_factory=list)
    """Targets a targeted collection refreshed in full beyond those it was given.

    A collector that expands a target it cannot fetch alone (an AWS volume id
    to the vm it is attached to) names the vm here; the refresh adds it to its
    deletion scope, so that vm's children are swept as if it had been targeted.
    """
    covers: frozenset[str] = frozenset()
    """Child collections this page lists *completely* for every parent it carries.

    In a targeted refresh a child collection is swept (children the cloud no
    longer has deleted) only for parents whose page covers it; a provider that
    leaves a child collection out of its targeted pages keeps those children.
    A targeted parent the cloud no longer has is gone with all its children
    whatever the coverage.  Full refreshes sweep everything (every page of a
    full refresh is complete by definition).
    """
    rejected: list[Rejection] = field(default_factory=list)
    """Objects the parser could not turn into rows (kept, retried later)."""

    def add(self, collection: str, row: Row) -> None:
        self.rows.setdefault(collection, []).append(row)

    def extend(self, collection: str, rows: list[Row]) -> None:
        self.rows.setdefault(collection, []).extend(rows)

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows.values())

    @classmethod
    def of(cls, rows: Mapping[str, list[Row]]) -> InventoryPage:
        return cls({k: list(v) for k, v in rows.items()})
