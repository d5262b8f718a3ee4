"""The AwesomeCloud object model: shapes, validation and random objects.

Flow: **simulator.model** -> simulator.cloud (Cloud) -> simulator.app (HTTP) -> client -> collector.

This module knows what an AwesomeCloud object looks like on the wire (it is
the simulator's half of the contract whose other half is ``parser``): which
fields each collection has, their types, their defaults on create, how
random objects are drawn from a ``random.Random`` (deterministically: the same
generator state gives the same objects).  It holds no state: ``cloud.Cloud``
does, and ``churn`` draws random mutations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from random import Random
from typing import Any

ApiObject = dict[str, Any]
"""An object as the API serves it (a JSON object)."""
CloudEvent = dict[str, Any]
"""A CloudEvents 1.0 event in JSON form, plus the ``sequence`` extension attribute."""

COLLECTIONS = ("flavors", "images", "security_groups", "vms")
SINGULAR = {
    "flavors": "flavor",
    "images": "image",
    "security_groups": "security_group",
    "vms": "vm",
}
ID_FORMAT = {
    "flavors": ("flavor", 2),
    "images": ("image", 2),
    "security_groups": ("sg", 2),
    "vms": ("vm", 6),
}
"""Generated ids: ``prefix-<counter zero-padded to width>``."""

VM_STATES = ("running", "stopped", "suspended")
OPERATING_SYSTEMS = ("ubuntu-22.04", "ubuntu-24.04", "debian-12", "rhel-9", "windows-2022")
GROUP_ROLES = ("web", "db", "ssh", "internal", "lb", "cache")
VM_ROLES = ("web", "db", "api", "worker", "cache", "batch")
TAG_POOL = (
    ("env", ("prod", "staging", "dev")),
    ("team", ("alpha", "beta", "gamma", "delta")),
    ("app", ("shop", "search", "billing", "auth", "media")),
)
ZONES = ("az-1", "az-2", "az-3")
DISK_SIZES = (10, 20, 40, 80, 100, 200, 500)
DEVICE_LETTERS = "abcdefghijklmnop"
_DEVICES = tuple(f"/dev/vd{c}" for c in DEVICE_LETTERS)
_BASE_EPOCH = 1_704_067_200  # 2024-01-01T00:00:00Z


class SimulatorError(Exception):
    """A request the simulated cloud refuses; ``status`` is its HTTP status."""

    status = 400


class BadRequestError(SimulatorError):
    status = 400


class NotFoundError(SimulatorError):
    status = 404


class ConflictError(SimulatorError):
    status = 409


# -- validation ------------------------------------------------------------------------

Validator = Callable[[str, Any], Any]


def _str(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequestError(f"{field} must be a string")
    return value


def _opt_str(field: str, value: Any) -> str | None:
    return None if value is None else _str(field, value)


def _count(field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequestError(f"{field} must be a non-negative integer")
    return value


def _tags(field: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequestError(f"{field} must be an object of strings")
    return dict(value)


def _ids(field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequestError(f"{field} must be a list of strings")
    if len(set(value)) != len(value):
        raise BadRequestError(f"{field} has duplicates")
    return list(value)


def _records(spec: dict[str, Validator], key: str, *, required: bool) -> Validator:
    def check(field: str, value: Any) -> list[ApiObject]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise BadRequestError(f"{field} must be a list of objects")
        out = []
        for i, item in enumerate(value):
            unknown = set(item) - set(spec)
            if unknown:
                raise BadRequestError(f"{field}[{i}] has unknown fields {sorted(unknown)}")
            if required and key not in item:
                raise BadRequestError(f"{field}[{i}] needs {key}")
            out.append({k: spec[k](f"{field}[{i}].{k}", v) for k, v in item.items()})
        keys = [item[key] for item in out if key in item]
        if len(set(keys)) != len(keys):
            raise BadRequestError(f"{field} has duplicate {key}s")
        return out

    return check


FIELDS: dict[str, dict[str, Validator]] = {
    "flavors": {
        "name": _str,
        "cpus": _count,
        "memory_mb": _count,
        "disk_gb": _count,
        "description": _str,
        "created_at": _str,
    },
    "images": {
        "name": _str,
        "os": _str,
        "size_gb": _count,
        "description": _str,
        "created_at": _str,
    },
    "security_groups": {"name": _str, "description": _str, "created_at": _str},
    "vms": {
        "name": _str,
        "state": _str,
        "flavor_id": _opt_str,
        "image_id": _opt_str,
        "security_group_ids": _ids,
        "tags": _tags,
        "zone": _str,
        "created_at": _str,
        "disks": _records({"device_name": _str, "size_gb": _count}, "device_name", required=True),
        "ports": _records({"id": _str, "mac": _str, "ip": _str}, "id", required=False),
    },
}


def validate(collection: str, fields: ApiObject) -> ApiObject:
    """Checked copies of ``fields`` (no ``id``); raises BadRequestError naming the field."""
    spec = FIELDS[collection]
    unknown = set(fields) - set(spec)
    if unknown:
        raise BadRequestError(f"unknown {SINGULAR[collection]} fields {sorted(unknown)}")
    return {k: spec[k](k, v) for k, v in fields.items()}


def defaults(collection: str, obj_id: str, now: datetime) -> ApiObject:
    """The fields of a created object that its body did not give."""
    base: ApiObject = {"name": obj_id}
    if collection == "flavors":
        base |= {"cpus": 1, "memory_mb": 1024}
    elif collection == "images":
        base |= {"os": "linux"}
    elif collection == "security_groups":
        base |= {"description": ""}
    elif collection == "vms":
        base |= {
            "state": "running",
            "flavor_id": None,
            "image_id": None,
            "security_group_ids": [],
            "tags": {},
            "disks": [],
            "ports": [],
        }
    base["created_at"] = _stamp(int(now.timestamp()) - _BASE_EPOCH)
    return base


# -- random objects ----------------------------------------------------------------------


def _stamp(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_BASE_EPOCH + seconds))


def _pick(rng: Random, seq: tuple[str, ...] | list[str]) -> str:
    return seq[int(rng.random() * len(seq))]


def seed_flavors() -> list[ApiObject]:
    """The eight flavors every cloud starts with."""
    table = (
        ("m1.tiny", 1, 512, 1),
        ("m1.small", 1, 2048, 20),
        ("m1.medium", 2, 4096, 40),
        ("m1.large", 4, 8192, 80),
        ("m1.xlarge", 8, 16384, 160),
        ("c1.medium", 2, 2048, 20),
        ("c1.large", 8, 8192, 80),
        ("r1.large", 4, 32768, 80),
    )
    return [
        {"name": name, "cpus": cpus, "memory_mb": mem, "disk_gb": disk, "created_at": _stamp(0)}
        for name, cpus, mem, disk in table
    ]


def random_image(rng: Random) -> ApiObject:
    os_name = _pick(rng, OPERATING_SYSTEMS)
    return {
        "name": f"{os_name}-build{int(rng.random() * 1000):03d}",
        "os": os_name,
        "size_gb": DISK_SIZES[int(rng.random() * 3)],
        "created_at": _stamp(int(rng.random() * 86_400 * 30)),
    }


def random_security_group(rng: Random) -> ApiObject:
    role = _pick(rng, GROUP_ROLES)
    return {
        "name": f"{role}-{int(rng.random() * 10_000):04d}",
        "description": f"allow {role} traffic",
        "created_at": _stamp(int(rng.random() * 86_400 * 30)),
    }


@dataclass(frozen=True, slots=True)
class VmChoices:
    """The ids a new vm may refer to."""

    flavors: list[str]
    images: list[str]
    security_groups: list[str]


def random_tags(rng: Random) -> dict[str, str]:
    return {key: _pick(rng, values) for key, values in TAG_POOL if rng.random() < 0.5}


def random_vm(rng: Random, choices: VmChoices, ports: list[ApiObject]) -> ApiObject:
    """A vm's fields; ``ports`` are given (their ids come from the cloud's counter).

    Written for speed (a 100k-vm cloud is built in a few seconds): one local
    ``random()`` per choice, no helper calls.
    """
    r = rng.random
    groups = choices.security_groups
    sg_ids: list[str] = []
    if groups:
        sg_ids.append(groups[int(r() * len(groups))])
        if r() < 0.3 and len(groups) > 1:
            second = groups[int(r() * len(groups))]
            if second != sg_ids[0]:
                sg_ids.append(second)
    tags = {}
    for key, values in TAG_POOL:
        if r() < 0.5:
            tags[key] = values[int(r() * len(values))]
    disks = [
        {"device_name": _DEVICES[i], "size_gb": DISK_SIZES[int(r() * 7)]}
        for i in range(1 + int(r() * 3))
    ]
    x = r()
    flavors, images = choices.flavors, choices.images
    return {
        "name": f"{VM_ROLES[int(r() * 6)]}-{int(r() * 1_000_000):06d}",
        "state": "running" if x < 0.8 else "stopped" if x < 0.95 else "suspended",
        "flavor_id": flavors[int(r() * len(flavors))] if flavors else None,
        "image_id": images[int(r() * len(images))] if images else None,
        "security_group_ids": sg_ids,
        "tags": tags,
        "disks": disks,
        "ports": ports,
        "zone": ZONES[int(r() * 3)],
        "created_at": _stamp(int(r() * 86_400 * 365)),
    }


def port_for(number: int) -> ApiObject:
    """Port number ``number``: a unique id, MAC and IPv4 address derived from it."""
    b = number.to_bytes(4, "big")
    return {
        "id": f"port-{number:06d}",
        "mac": "02:00:" + b.hex(":"),
        "ip": f"10.{b[1]}.{b[2]}.{b[3]}",
    }
