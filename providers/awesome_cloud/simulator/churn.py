"""Churn: random realistic mutations of a simulated cloud.

Flow: **simulator.churn** -> simulator.cloud (Cloud.create/update/delete) -> events -> catchers.

``apply_random_mutation`` applies exactly one mutation, chosen at random
(create or delete a vm, change a vm's state, tags, disks, ports, security
groups or flavor, rename a flavor/image/group, create or delete an image),
always through the cloud's public mutation methods, so each produces its
event like any API call.  Everything random is drawn from the ``Random``
given, so a seeded generator replays the same churn on the same cloud.
"""

from __future__ import annotations

from collections.abc import Callable
from random import Random
from typing import Protocol

from providers.awesome_cloud.simulator.model import (
    DEVICE_LETTERS,
    DISK_SIZES,
    VM_STATES,
    ApiObject,
    VmChoices,
    random_image,
    random_tags,
    random_vm,
)


class MutableCloud(Protocol):
    """What churn needs of a cloud: reads, and the one mutation path."""

    def get(self, collection: str, obj_id: str) -> ApiObject | None: ...
    def count(self, collection: str) -> int: ...
    def ids(self, collection: str) -> list[str]: ...
    def random_id(self, collection: str, rng: Random) -> str | None: ...
    def create(self, collection: str, fields: ApiObject) -> ApiObject: ...
    def update(self, collection: str, obj_id: str, fields: ApiObject) -> ApiObject: ...
    def delete(self, collection: str, obj_id: str) -> ApiObject: ...


def _random_vm(cloud: MutableCloud, rng: Random) -> tuple[str, ApiObject] | None:
    vm_id = cloud.random_id("vms", rng)
    vm = cloud.get("vms", vm_id) if vm_id else None
    return (vm_id, vm) if vm_id and vm else None


def apply_random_mutation(cloud: MutableCloud, rng: Random) -> None:
    """Apply exactly one random realistic mutation through create/update/delete."""
    op = rng.choices(_OPS, _WEIGHTS)[0]
    picked = _random_vm(cloud, rng)
    if picked is None and op not in (_rename, _create_image, _delete_image):
        op = _create_vm
    op(cloud, rng, picked)


Picked = tuple[str, ApiObject] | None


def _create_vm(cloud: MutableCloud, rng: Random, _: Picked) -> None:
    choices = VmChoices(cloud.ids("flavors"), cloud.ids("images"), cloud.ids("security_groups"))
    cloud.create("vms", random_vm(rng, choices, [{} for _ in range(1 + (rng.random() < 0.3))]))


def _delete_vm(cloud: MutableCloud, rng: Random, picked: Picked) -> None:
    assert picked is not None
    cloud.delete("vms", picked[0])


def _set_state(cloud: MutableCloud, rng: Random, picked: Picked) -> None:
    assert picked is not None
    vm_id, vm = picked
    others = [s for s in VM_STATES if s != vm.get("state")]
    cloud.update("vms", vm_id, {"state": others[int(rng.random() * len(others))]})


def _set_tags(cloud: MutableCloud, rng: Random, picked: Picked) -> None:
    assert picked is not None
    cloud.update("vms", picked[0], {"tags": random_tags(rng)})


def _change_disks(cloud: MutableCloud, rng: Random, picked: Picked) -> None:
    assert picked is not None
    vm_id, vm = picked
    disks = list(vm.get("disks", []))
    used = {d["device_name"] for d in disks}
    free = [f"/dev/vd{c}" for c in DEVICE_LETTERS if f"/dev/vd{c}" not in used]
    if disks and (not free or rng.random() < 0.5):
        disks.pop(int(rng.random() * len(disks)))
    else:
        disks.append(
            {"device_name": free[0], "size_gb": DISK_SIZES[int(rng.random() * len(DISK_SIZES))]}
        )
    cloud.update("vms", vm_id, {"disks": disks})


def _change_ports(cloud: MutableCloud, rng: Random, picked: Picked) -> None:
    assert picked is not None
    vm_id, vm = picked
    ports = list(vm.get("ports", []))
    if len(ports) > 1 and rng.random() < 0.5:
        ports.pop(int(rng.random() * len(ports)))
    else:
        ports.append({})
    cloud.update("vms", vm_id, {"ports": ports})


def _set_groups(cloud: MutableCloud, rng: Random, picked: Picked) -> None:
    assert picked is not None
    groups = cloud.ids("security_groups")
    count = min(len(groups), 1 + int(rng.random() * 2))
    cloud.update("vms", picked[0], {"security_group_ids": rng.sample(groups, count)})


def _resize(cloud: MutableCloud, rng: Random, picked: Picked) -> None:
    assert picked is not None
    flavor = cloud.random_id("flavors", rng)
    cloud.update("vms", picked[0], {"flavor_id": flavor})


def _rename(cloud: MutableCloud, rng: Random, _: Picked) -> None:
    collection = ("flavors", "images", "security_groups")[int(rng.random() * 3)]
    obj_id = cloud.random_id(collection, rng)
    if obj_id is None:
        _create_image(cloud, rng, None)
        return
    cloud.update(collection, obj_id, {"name": f"{obj_id}-renamed{int(rng.random() * 1000)}"})


def _create_image(cloud: MutableCloud, rng: Random, _: Picked) -> None:
    cloud.create("images", random_image(rng))


def _delete_image(cloud: MutableCloud, rng: Random, _: Picked) -> None:
    if cloud.count("images") <= 1:
        _create_image(cloud, rng, None)
        return
    image_id = cloud.random_id("images", rng)
    assert image_id is not None
    cloud.delete("images", image_id)


_OPS: list[Callable[[MutableCloud, Random, Picked], None]] = [
    _create_vm,
    _delete_vm,
    _set_state,
    _set_tags,
    _change_disks,
    _change_ports,
    _set_groups,
    _resize,
    _rename,
    _create_image,
    _delete_image,
]
_WEIGHTS = [3, 2, 4, 3, 3, 1, 1, 1, 2, 1, 1]
