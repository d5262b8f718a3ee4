"""EC2 API objects -> inventory rows.

Flow: collector -> client -> **parser** -> InventoryPage -> persister.

Pure functions, shared by full and targeted refreshes, producing rows in the
shapes of ``daemon.model.inventory``:

=====================  ================================================================
vms                    instance: ems_ref = InstanceId, name = the Name tag (else the id),
                       state = State.Name, flavor = InstanceType, image = ImageId,
                       tags, extra = placement, network and launch details
disks                  a block device mapping: vm, device_name, size_gb (from the
                       volume when known), extra = volume id, type, status...
network_ports          a network interface: vm, ems_ref = NetworkInterfaceId,
                       mac_address, ip_address (the private IP), extra
vm_security_groups     vm, security_group: the instance's groups and its interfaces'
security_groups        ems_ref = GroupId, name = GroupName, extra = vpc, description
images                 ems_ref = ImageId, name, os (Windows/Linux/...), extra
flavors                ems_ref = name = instance type, cpus = default vCPUs,
                       memory_mb = memory in MiB, extra
=====================  ================================================================

``extra`` values are JSON-able (datetimes become ISO 8601 text).  A page of
instances always carries the four vm collections (possibly empty lists) so
that a vm which lost its last disk gets its disks removed; children are
unique by their key within their vm.  An object without a usable id is
skipped with a warning, never raised on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Final

from daemon.api import InventoryPage, Rejection, RejectReason, Row

log = logging.getLogger(__name__)

ApiObject = Mapping[str, Any]

VM_COLLECTIONS = ("vms", "disks", "network_ports", "vm_security_groups")
VM_CHILDREN = frozenset(VM_COLLECTIONS[1:])
"""A page of instances lists every disk, port and group link of each (``InventoryPage.covers``)."""


def jsonable(value: Any) -> Any:
    """``value`` with datetimes as ISO 8601 text (API answers hold datetimes)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _compact(values: Mapping[str, Any]) -> dict[str, Any] | None:
    kept = {k: jsonable(v) for k, v in values.items() if v not in (None, "", [], {})}
    return kept or None


def tags_of(obj: ApiObject) -> dict[str, str]:
    return {
        str(t["Key"]): str(t.get("Value", ""))
        for t in obj.get("Tags") or obj.get("TagSet") or ()
        if isinstance(t, Mapping) and "Key" in t
    }


def instance_groups(instance: ApiObject) -> list[str]:
    """The security group ids of an instance and of its network interfaces, in order."""
    groups: dict[str, None] = {}
    for group in instance.get("SecurityGroups") or ():
        if group.get("GroupId"):
            groups[group["GroupId"]] = None
    for eni in instance.get("NetworkInterfaces") or ():
        for group in eni.get("Groups") or ():
            if group.get("GroupId"):
                groups[group["GroupId"]] = None
    return list(groups)


def volume_ids(instance: ApiObject) -> list[str]:
    return [
        m["Ebs"]["VolumeId"]
        for m in instance.get("BlockDeviceMappings") or ()
        if isinstance(m.get("Ebs"), Mapping) and m["Ebs"].get("VolumeId")
    ]


def parse_instances(
    instances: Iterable[ApiObject], volumes: Mapping[str, ApiObject] | None = None
) -> InventoryPage:
    """A page of vms with their disks, ports and security group links."""
    page = InventoryPage({name: [] for name in VM_COLLECTIONS}, covers=VM_CHILDREN)
    volumes = volumes or {}
    for instance in instances:
        vm = instance.get("InstanceId")
        if not isinstance(vm, str) or not vm:
            log.warning("skipping an EC2 instance without an InstanceId: %.200r", instance)
            continue
        try:
            row = vm_row(instance)
            disks = disk_rows(vm, instance, volumes)
            ports = port_rows(vm, instance)
            links = [{"vm": vm, "security_group": group} for group in instance_groups(instance)]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # one malformed instance: reported and kept as it was; the rest of the page saves
            page.rejected.append(
                Rejection("vms", vm, RejectReason.PARSE_ERROR, f"{type(exc).__name__}: {exc}")
            )
            continue
        page.add("vms", row)
        page.extend("disks", disks)
        page.extend("network_ports", ports)
        page.extend("vm_security_groups", links)
    return page


def vm_row(instance: ApiObject) -> Row:
    tags = tags_of(instance)
    placement = instance.get("Placement") or {}
    return {
        "ems_ref": instance["InstanceId"],
        "name": tags.get("Name") or instance["InstanceId"],
        "state": (instance.get("State") or {}).get("Name"),
        "flavor": instance.get("InstanceType"),
        "image": instance.get("ImageId"),
        "tags": tags or None,
        "extra": _compact(
            {
                "placement": {k: v for k, v in placement.items() if v not in (None, "")},
                "vpc_id": instance.get("VpcId"),
                "subnet_id": instance.get("SubnetId"),
                "private_ip": instance.get("PrivateIpAddress"),
                "public_ip": instance.get("PublicIpAddress"),
                "private_dns": instance.get("PrivateDnsName"),
                "public_dns": instance.get("PublicDnsName"),
                "launch_time": instance.get("LaunchTime"),
                "architecture": instance.get("Architecture"),
                "platform": instance.get("PlatformDetails") or instance.get("Platform"),
                "key_name": instance.get("KeyName"),
                "root_device_name": instance.get("RootDeviceName"),
                "lifecycle": instance.get("InstanceLifecycle"),
                "state_reason": (instance.get("StateReason") or {}).get("Message"),
            }
        ),
    }


def _first_by(key: str, items: Iterable[ApiObject] | None) -> dict[str, ApiObject]:
    """The items with a non-empty string ``key``, by key (the first item of each key)."""
    firsts: dict[str, ApiObject] = {}
    for item in items or ():
        ref = item.get(key)
        if isinstance(ref, str) and ref and ref not in firsts:
            firsts[ref] = item
    return firsts


def disk_rows(vm: str, instance: ApiObject, volumes: Mapping[str, ApiObject]) -> list[Row]:
    rows: list[Row] = []
    for device, mapping in _first_by("DeviceName", instance.get("BlockDeviceMappings")).items():
        ebs = mapping.get("Ebs") or {}
        volume = volumes.get(ebs.get("VolumeId", ""), {})
        row: Row = {
            "vm": vm,
            "device_name": device,
            "size_gb": volume.get("Size"),
            "extra": _compact(
                {
                    "volume_id": ebs.get("VolumeId"),
                    "status": ebs.get("Status"),
                    "delete_on_termination": ebs.get("DeleteOnTermination"),
                    "volume_type": volume.get("VolumeType"),
                    "iops": volume.get("Iops"),
                    "encrypted": volume.get("Encrypted"),
                    "availability_zone": volume.get("AvailabilityZone"),
                }
            ),
        }
        rows.append(row)
    return rows


def port_rows(vm: str, instance: ApiObject) -> list[Row]:
    rows: list[Row] = []
    for ref, eni in _first_by("NetworkInterfaceId", instance.get("NetworkInterfaces")).items():
        attachment = eni.get("Attachment") or {}
        row: Row = {
            "vm": vm,
            "ems_ref": ref,
            "mac_address": eni.get("MacAddress"),
            "ip_address": eni.get("PrivateIpAddress"),
            "extra": _compact(
                {
                    "public_ip": (eni.get("Association") or {}).get("PublicIp"),
                    "subnet_id": eni.get("SubnetId"),
                    "vpc_id": eni.get("VpcId"),
                    "device_index": attachment.get("DeviceIndex"),
                    "status": eni.get("Status"),
                    "description": eni.get("Description"),
                    "interface_type": eni.get("InterfaceType"),
                }
            ),
        }
        rows.append(row)
    return rows


def security_group_rows(groups: Iterable[ApiObject]) -> list[Row]:
    return _tagged_rows(groups, "GroupId", "GroupName", _GROUP_EXTRA)


def image_rows(images: Iterable[ApiObject]) -> list[Row]:
    return _tagged_rows(images, "ImageId", "Name", _IMAGE_EXTRA, os=image_os)


# The extra fields of a security group and of an image: extra key -> API field (tags follow).
_GROUP_EXTRA: Final = {"vpc_id": "VpcId", "description": "Description", "owner_id": "OwnerId"}
_IMAGE_EXTRA: Final = {
    "owner_id": "OwnerId",
    "public": "Public",
    "state": "State",
    "architecture": "Architecture",
    "creation_date": "CreationDate",
    "description": "Description",
    "root_device_type": "RootDeviceType",
}


def _tagged_rows(
    objects: Iterable[ApiObject],
    id_key: str,
    name_key: str,
    extra_fields: Mapping[str, str],
    **columns: Callable[[ApiObject], Any],
) -> list[Row]:
    """Rows of the objects that have an ``id_key``.

    Each row: ems_ref (the id), name (``name_key``, else the id), the ``columns``
    (each a function of the object) and extra (``extra_fields``, then the tags).
    """
    rows: list[Row] = []
    for obj in objects:
        if not obj.get(id_key):
            continue
        row: Row = {"ems_ref": obj[id_key], "name": obj.get(name_key) or obj[id_key]}
        for column, value_of in columns.items():
            row[column] = value_of(obj)
        extra = {field: obj.get(key) for field, key in extra_fields.items()}
        row["extra"] = _compact({**extra, "tags": tags_of(obj)})
        rows.append(row)
    return rows


def image_os(image: ApiObject) -> str:
    """The image's operating system family: the platform details, else Windows or Linux/UNIX."""
    details = image.get("PlatformDetails")
    if isinstance(details, str) and details:
        return details
    return "Windows" if image.get("Platform") == "windows" else "Linux/UNIX"


def flavor_rows(types: Iterable[ApiObject]) -> list[Row]:
    return [
        {
            "ems_ref": t["InstanceType"],
            "name": t["InstanceType"],
            "cpus": (t.get("VCpuInfo") or {}).get("DefaultVCpus"),
            "memory_mb": (t.get("MemoryInfo") or {}).get("SizeInMiB"),
            "extra": _compact(
                {
                    "architectures": (t.get("ProcessorInfo") or {}).get("SupportedArchitectures"),
                    "current_generation": t.get("CurrentGeneration"),
                    "hypervisor": t.get("Hypervisor"),
                    "network_performance": (t.get("NetworkInfo") or {}).get("NetworkPerformance"),
                }
            ),
        }
        for t in types
        if t.get("InstanceType")
    ]
