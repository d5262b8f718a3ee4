"""The AwesomeCloud event mapper, from payloads the simulator really emits.

The fixtures under ``tests/fixtures/events/awesome_cloud/`` were recorded once
by subscribing to a ``Cloud.generate(vms=3, seed=7, instance_id="f1x7")`` with
a fixed clock and applying one mutation per file (create / update / delete
of each kind; a disk attached and a port added, which the simulator reports
as ``vm.updated``).  Cases the simulator does not emit (disk/port-style
events carrying only ``data.vm_id``, unknown types, broken events) are
derived from a recorded payload in the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from catchers.cloudevents import decode_structured
from daemon.model.targets import Target
from providers.awesome_cloud.events import map_event

FIXTURES = Path(__file__).parent / "fixtures" / "events" / "awesome_cloud"


def recorded(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return event


@pytest.mark.parametrize(
    ("fixture", "collection", "ref"),
    [
        ("vm_created", "vms", "vm-000004"),
        ("vm_updated_state", "vms", "vm-000004"),
        ("vm_updated_disk_attached", "vms", "vm-000004"),
        ("vm_updated_port_added", "vms", "vm-000004"),
        ("vm_deleted", "vms", "vm-000004"),
        ("image_created", "images", "image-06"),
        ("image_deleted", "images", "image-06"),
        ("flavor_updated", "flavors", "flavor-03"),
        ("security_group_created", "security_groups", "sg-06"),
        ("security_group_updated", "security_groups", "sg-06"),
    ],
)
def test_recorded_events_target_their_object(fixture: str, collection: str, ref: str) -> None:
    event = recorded(fixture)

    targets = map_event("awesome", event)

    assert targets == [Target.of("awesome", collection, ref)]
    assert targets[0].event_id == event["id"]


def test_every_fixture_is_mapped_to_exactly_one_target() -> None:
    names = sorted(p.stem for p in FIXTURES.glob("*.json"))
    assert len(names) >= 10
    for name in names:
        assert len(map_event("m", recorded(name))) == 1, name


def test_the_decoded_cloudevent_dict_maps_like_the_raw_payload() -> None:
    raw = recorded("vm_updated_disk_attached")
    decoded = decode_structured(json.dumps(raw)).to_dict()

    assert decoded["sequence"] == raw["sequence"]  # extensions stay top-level keys
    assert map_event("m", decoded) == map_event("m", raw)


def test_targets_belong_to_the_given_manager() -> None:
    (target,) = map_event("aws-prod", recorded("vm_created"))
    assert target.manager == "aws-prod"
    assert str(target) == "aws-prod:vms:vm-000004"


def test_disk_or_port_style_event_with_only_a_vm_id_targets_the_vm() -> None:
    event = recorded("vm_updated_disk_attached")
    event.update(
        type="com.awesomecloud.disk.attached",
        subject="vol-77",
        data={"vm_id": "vm-000004", "device_name": "/dev/vdb"},
    )

    assert map_event("m", event) == [Target.of("m", "vms", "vm-000004")]

    event.update(type="com.awesomecloud.port.deleted", subject=None, data={"vm_id": "vm-000009"})
    (target,) = map_event("m", event)
    assert target == Target.of("m", "vms", "vm-000009")
    assert target.event_id == event["id"]


@pytest.mark.parametrize(
    "event_type",
    [
        "com.awesomecloud.account.updated",
        "com.awesomecloud.vm.metrics",
        "com.awesomecloud.billing",
    ],
)
def test_unknown_awesome_types_ask_for_nothing(event_type: str) -> None:
    event = recorded("vm_updated_state")
    event["type"] = event_type

    assert map_event("m", event) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"type": "com.amazon.ec2.instance.state"}, "not an AwesomeCloud event"),
        ({"type": None}, "not an AwesomeCloud event"),
        ({"subject": None}, "has no subject"),
        ({"subject": ""}, "has no subject"),
        ({"type": "com.awesomecloud.disk.attached", "data": {"vm_id": 7}}, "vm_id is not an id"),
    ],
)
def test_unusable_events_raise_value_error_with_the_reason(
    change: dict[str, Any], reason: str
) -> None:
    event = recorded("vm_updated_state")
    event.update(change)

    with pytest.raises(ValueError, match=reason):
        map_event("m", event)


def test_mapping_is_pure() -> None:
    event = recorded("vm_deleted")
    before = json.dumps(event, sort_keys=True)

    assert map_event("m", event) == map_event("m", event)
    assert json.dumps(event, sort_keys=True) == before
