"""What the shipped providers' parsers promise the persister (issue 14 items 1 and 9):
a page of vms covers their child collections, and one malformed object is rejected
alone (``parse_error``) while the rest of the page is kept."""

from __future__ import annotations

from typing import Any

from daemon.model.rejection import RejectReason
from providers.awesome_cloud.parser import parse_page, parse_vms
from providers.aws.parser import parse_instances

CHILDREN = frozenset({"disks", "network_ports", "vm_security_groups"})


class Corrupt(dict[str, Any]):
    """An API object that raises when a field is read (a decoding bug, a broken proxy)."""

    def get(self, key: str, default: Any = None) -> Any:
        if key == "name":
            raise ValueError("corrupt field")
        return super().get(key, default)


def test_aws_instances_page_covers_children_and_rejects_a_malformed_instance() -> None:
    good = {"InstanceId": "i-1", "SecurityGroups": [{"GroupId": "sg-1"}]}
    bad = {"InstanceId": "i-2", "SecurityGroups": ["sg-1"]}  # a string, not an object
    page = parse_instances([good, bad])
    assert page.covers == CHILDREN
    assert [r["ems_ref"] for r in page.rows["vms"]] == ["i-1"]
    assert page.rows["vm_security_groups"] == [{"vm": "i-1", "security_group": "sg-1"}]
    assert [(r.collection, r.ref, r.reason) for r in page.rejected] == [
        ("vms", "i-2", RejectReason.PARSE_ERROR)
    ]


def test_awesome_vms_page_covers_children_and_rejects_a_malformed_vm() -> None:
    good = {"id": "vm-1", "name": "a", "disks": [{"device_name": "sda", "size_gb": 1}]}
    bad = Corrupt({"id": "vm-2", "name": "b", "disks": [{"device_name": "sda"}]})
    page = parse_vms([good, bad])
    assert page.covers == CHILDREN
    assert [r["ems_ref"] for r in page.rows["vms"]] == ["vm-1"]
    assert [d["vm"] for d in page.rows["disks"]] == ["vm-1"]
    assert [(r.ref, r.reason) for r in page.rejected] == [("vm-2", RejectReason.PARSE_ERROR)]
    assert "corrupt field" in page.rejected[0].error


def test_awesome_flavors_page_rejects_a_malformed_flavor() -> None:
    page = parse_page("flavors", [{"id": "f1"}, Corrupt({"id": "f2"})])
    assert [r["ems_ref"] for r in page.rows["flavors"]] == ["f1"]
    assert [(r.collection, r.ref) for r in page.rejected] == [("flavors", "f2")]
    assert page.covers == frozenset()
