"""A targeted page states which child collections it covers; the others are kept
(issue 14 item 9), on SQLite and PostgreSQL, through the real refresher.

The provider here is deliberately incomplete: its targeted collector returns vms
with their network ports and security group links but never their disks (an API
that needs another call it forgot).  Its full collector is complete.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Self

from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.inventory import InventoryPage
from daemon.model.targets import Target, TargetCollection
from daemon.persistence.persister import Persister
from daemon.pipeline.refresher import RefreshableManager, Refresher
from tests.inventory_builders import MANAGER, Cloud, fleet, of_vms, snapshot, vm_targets


class DisklessTargetedConnection:
    """A provider connection to ``cloud`` whose targeted pages leave disks out."""

    def __init__(self, cloud: Cloud, *, declares: bool) -> None:
        self.cloud = cloud
        self.declares = declares

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def collect_full(self) -> AsyncGenerator[InventoryPage, None]:
        for page in self.cloud.full_pages():
            yield page

    async def collect_targeted(
        self, targets: TargetCollection
    ) -> AsyncGenerator[InventoryPage, None]:
        covers = ("network_ports", "vm_security_groups")
        page = self.cloud.targeted_page(
            *sorted(targets.references("vms")), covers=covers if self.declares else ()
        )
        page.rows.pop("disks", None)
        yield page


def refresher(persister: Persister, cloud: Cloud, *, declares: bool = True) -> Refresher:
    connection = DisklessTargetedConnection(cloud, declares=declares)
    return Refresher(persister, {MANAGER: RefreshableManager(MANAGER, "test", connection)})


async def test_child_collection_a_targeted_page_does_not_cover_is_kept(
    persister: Persister, engine: AsyncEngine
) -> None:
    cloud = fleet(3)
    await refresher(persister, cloud).refresh(TargetCollection(MANAGER, [Target.full(MANAGER)]))
    before = await snapshot(engine)
    cloud.vm("v1", name="v1-new", disks=("sda", "sdb"), ports=())  # v1 lost its port
    cloud.remove_vm("v2")  # v2 is gone: all its children go, covered or not

    result = await refresher(persister, cloud).refresh(vm_targets("v1", "v2"))

    after = await snapshot(engine)
    assert after["vms"]["v1"]["name"] == "v1-new"
    assert of_vms(after, ["v1"])["disks"] == of_vms(before, ["v1"])["disks"]  # not covered
    assert of_vms(after, ["v1"])["network_ports"] == {}  # covered: swept
    assert after["vms"]["v2"]["archived_at"] is not None
    assert of_vms(after, ["v2"])["disks"] == {}
    assert result.details() == {
        "vms": {"updated": 1, "archived": 1},
        "disks": {"deleted": 2},
        "network_ports": {"deleted": 2},
    }


async def test_a_page_that_declares_nothing_sweeps_no_children_of_live_vms(
    persister: Persister, engine: AsyncEngine
) -> None:
    cloud = fleet(2)
    await refresher(persister, cloud).refresh(TargetCollection(MANAGER, [Target.full(MANAGER)]))
    before = await snapshot(engine)
    cloud.vm("v0", ports=())

    result = await refresher(persister, cloud, declares=False).refresh(vm_targets("v0"))

    after = await snapshot(engine)
    assert of_vms(after, ["v0"])["disks"] == of_vms(before, ["v0"])["disks"]
    assert of_vms(after, ["v0"])["network_ports"] == of_vms(before, ["v0"])["network_ports"]
    assert result.total.deleted == 0
