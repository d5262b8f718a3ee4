"""The AWS event mapper, from payloads shaped like AWS's published examples.

The fixtures under ``tests/fixtures/aws_events/`` follow the documented
formats: EventBridge events (``EC2 Instance State-change Notification``,
``AWS API Call via CloudTrail`` for EC2 calls, ``Config Configuration Item
Change``, unrelated ones), and AWS Config notifications as SNS delivers their
message.  Ids and accounts are made up (123456789012 / us-east-1 and
210987654321 / eu-west-1).  Other cases are derived from a fixture in the test.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catchers.cloudevents import decode_kafka_record, decode_structured
from daemon.model.targets import Target
from providers.aws.events import MAX_DEPTH, MAX_NODES, account_region, map_event

FIXTURES = Path(__file__).parent / "fixtures" / "aws_events"
TRANSPORT_ID = "aws-events/0/42"
COLLECTIONS = {"vms", "images", "security_groups", "disks", "network_ports"}

VM = "i-0a1b2c3d4e5f60718"
VOL = "vol-049df61146c4d7901"
SG = "sg-0123456789abcdef0"


def document(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return loaded


def plain(data: Any) -> dict[str, Any]:
    """The dict a mapper gets for a plain (envelope-less) AWS JSON record."""
    return {
        "specversion": None,
        "id": TRANSPORT_ID,
        "source": "kafka:aws-events",
        "type": "",
        "subject": None,
        "time": None,
        "datacontenttype": "application/json",
        "dataschema": None,
        "data": data,
    }


def refs(targets: list[Target]) -> list[tuple[str, str]]:
    return [(t.association, t.manager_ref["ems_ref"]) for t in targets]


EXPECTED: dict[str, list[tuple[str, str]]] = {
    "ec2_state_change_running": [("vms", VM)],
    # the image it was launched from, the group of its interface, the vm; the eni is the vm's
    "cloudtrail_run_instances": [
        ("images", "ami-0abcdef1234567890"),
        ("security_groups", SG),
        ("vms", VM),
    ],
    "cloudtrail_terminate_instances": [("vms", VM)],
    "cloudtrail_stop_instances": [("vms", "i-0b2c3d4e5f6071829"), ("vms", "i-0c3d4e5f607182930")],
    # tagged resources are unrelated: each maps on its own (the subnet is not ours)
    "cloudtrail_create_tags": [("vms", VM), ("disks", VOL), ("security_groups", SG)],
    "cloudtrail_attach_volume": [("vms", VM)],
    "cloudtrail_detach_volume": [("vms", VM)],
    "cloudtrail_modify_volume": [("disks", "vol-0d1e2f3a4b5c6d7e8")],
    "cloudtrail_authorize_security_group_ingress": [("security_groups", SG)],
    "cloudtrail_create_network_interface": [
        ("security_groups", "sg-0fedcba9876543210"),
        ("network_ports", "eni-0123456789abcdef1"),
    ],
    "cloudtrail_attach_network_interface": [("vms", "i-0f9e8d7c6b5a49382")],
    "cloudtrail_describe_instances_read_only": [],
    "cloudtrail_run_instances_unauthorized": [],
    "config_instance_update": [("vms", "i-0b2c3d4e5f6071829")],
    "config_volume_attached": [("vms", VM)],
    "config_security_group_deleted": [("security_groups", "sg-0fedcba9876543210")],
    "eventbridge_config_network_interface_change": [("vms", "i-0f9e8d7c6b5a49382")],
    "config_oversized_instance": [("vms", "i-0c3d4e5f607182930")],
    "config_snapshot_delivery_completed": [],
    "eventbridge_spot_interruption": [],
    "eventbridge_s3_object_created": [],
}


def test_every_fixture_has_an_expectation() -> None:
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_maps_to_its_targets(name: str) -> None:
    targets = map_event("aws-prod", plain(document(name)))

    assert refs(targets) == EXPECTED[name]
    assert all(t.manager == "aws-prod" for t in targets)


@pytest.mark.parametrize(
    "name", [n for n in sorted(EXPECTED) if n.startswith(("ec2_", "cloudtrail_", "eventbridge_"))]
)
def test_eventbridge_targets_carry_the_eventbridge_id(name: str) -> None:
    event_id = document(name)["id"]
    assert {t.event_id for t in map_event("m", plain(document(name)))} <= {event_id}


def test_config_targets_carry_an_id_of_the_configuration_state() -> None:
    item = document("config_volume_attached")
    (target,) = map_event("m", plain(item))
    assert target.event_id == f"config:{VOL}:1714568472530"

    del item["configurationItem"]["configurationStateId"]
    (target,) = map_event("m", plain(item))
    assert target.event_id == f"config:{VOL}@2024-05-01T13:01:12.530Z"

    del item["configurationItem"]["configurationItemCaptureTime"]
    (target,) = map_event("m", plain(item))
    assert target.event_id == TRANSPORT_ID


def test_a_cloudevents_envelope_around_the_aws_json_maps_the_same() -> None:
    aws = document("cloudtrail_run_instances")
    envelope = {
        "specversion": "1.0",
        "id": "ce-1",
        "source": "/aws/eventbridge",
        "type": "aws.ec2.api-call",
        "datacontenttype": "application/json",
        "data": aws,
    }
    structured = decode_structured(json.dumps(envelope)).to_dict()
    (bare,) = decode_kafka_record((), json.dumps(aws).encode(), plain_id=TRANSPORT_ID)

    assert (
        map_event("m", structured) == map_event("m", bare.to_dict()) == map_event("m", plain(aws))
    )
    assert refs(map_event("m", structured)) == EXPECTED["cloudtrail_run_instances"]


# -- CloudTrail rules ---------------------------------------------------------------


def cloudtrail(request: Any = None, response: Any = None, **detail: Any) -> dict[str, Any]:
    """A CloudTrail-via-EventBridge event around the given parameters."""
    event = document("cloudtrail_attach_volume")
    event["detail"].update(requestParameters=request, responseElements=response, **detail)
    return event


def test_a_failed_or_read_only_call_or_another_service_asks_for_nothing() -> None:
    named = {"instanceId": VM}
    assert refs(map_event("m", plain(cloudtrail(named)))) == [("vms", VM)]
    assert map_event("m", plain(cloudtrail(named, errorCode="Client.InvalidInstanceID"))) == []
    assert map_event("m", plain(cloudtrail(named, readOnly=True))) == []
    assert map_event("m", plain(cloudtrail(named, eventSource="s3.amazonaws.com"))) == []


def test_volumes_and_interfaces_map_to_themselves_unless_a_vm_is_named() -> None:
    alone = {"volumeId": VOL, "networkInterfaceId": "eni-0aa1bb2cc3dd4ee5f"}
    assert refs(map_event("m", plain(cloudtrail(alone)))) == [
        ("disks", VOL),
        ("network_ports", "eni-0aa1bb2cc3dd4ee5f"),
    ]
    # the vm may be named only in the response (DetachVolume): still the vm alone
    assert refs(map_event("m", plain(cloudtrail(alone, {"instanceId": VM})))) == [("vms", VM)]


def test_a_tagged_child_maps_on_its_own_even_beside_a_vm() -> None:
    request = {"resourcesSet": {"items": [{"resourceId": VOL}]}, "instanceId": VM}
    assert refs(map_event("m", plain(cloudtrail(request)))) == [("vms", VM), ("disks", VOL)]


def test_ids_need_their_prefix_and_plural_lists_count() -> None:
    request = {
        "placement": {"groupId": "pg-0123456789abcdef0", "groupName": "cluster"},
        "imageId": "snap-0123",  # not an image id
        "InstanceIds": [VM, "i-0b2c3d4e5f6071829", 7, "i-"],
        "groupIds": [SG],
        "instanceId": {"nested": "not an id"},
    }
    assert refs(map_event("m", plain(cloudtrail(request)))) == [
        ("vms", VM),
        ("vms", "i-0b2c3d4e5f6071829"),
        ("security_groups", SG),
    ]


def test_targets_are_deduplicated_in_order() -> None:
    request = {"instancesSet": {"items": [{"instanceId": VM}, {"instanceId": VM}]}}
    response = {"instancesSet": {"items": [{"instanceId": VM, "imageId": "ami-01"}]}}
    targets = map_event("m", plain(cloudtrail(request, response)))
    assert refs(targets) == [("vms", VM), ("images", "ami-01")]


def nest(levels: int, leaf: dict[str, Any]) -> dict[str, Any]:
    node = leaf
    for _ in range(levels):
        node = {"deeper": node}
    return node


def test_the_walk_reads_a_bounded_depth() -> None:
    reachable = nest(MAX_DEPTH - 1, {"instanceId": VM})
    too_deep = nest(MAX_DEPTH, {"instanceId": VM})
    assert refs(map_event("m", plain(cloudtrail(reachable)))) == [("vms", VM)]
    assert map_event("m", plain(cloudtrail(too_deep))) == []
    # objects in an array are at the array's level: instancesSet.items[].instanceId is 2 down
    listed = nest(MAX_DEPTH - 3, {"instancesSet": {"items": [[{"instanceId": VM}]]}})
    assert map_event("m", plain(cloudtrail(listed))) == []  # a nested array is one more level
    listed = nest(MAX_DEPTH - 3, {"instancesSet": {"items": [{"instanceId": VM}]}})
    assert refs(map_event("m", plain(cloudtrail(listed)))) == [("vms", VM)]


def test_a_very_deep_payload_neither_recurses_forever_nor_blows_the_stack() -> None:
    deep_objects = nest(200_000, {"instanceId": VM})
    deep_arrays: Any = [VM]
    for _ in range(200_000):
        deep_arrays = [deep_arrays]
    targets = map_event("m", plain(cloudtrail(deep_objects, {"instanceIds": deep_arrays})))
    assert targets == []  # the vm is below the depth read, and no full refresh either


def test_a_payload_too_large_to_walk_asks_for_a_full_refresh() -> None:
    items = [{"instanceId": f"i-{n:017x}"} for n in range(MAX_NODES)]
    event = cloudtrail({"instancesSet": {"items": items}})
    assert map_event("m", plain(event)) == [Target.full("m", event_id=event["id"])]


# -- Config rules --------------------------------------------------------------------


def config_item(resource_type: str, resource_id: str, relationships: Any = ()) -> dict[str, Any]:
    message = document("config_volume_attached")
    message["configurationItem"].update(
        resourceType=resource_type, resourceId=resource_id, relationships=list(relationships)
    )
    return message


ATTACHED = {"resourceType": "AWS::EC2::Instance", "name": "Is attached to Instance"}


def test_config_children_map_to_their_vms_or_to_themselves() -> None:
    eni = "eni-0aa1bb2cc3dd4ee5f"
    other = "i-0b2c3d4e5f6071829"
    cases: list[tuple[dict[str, Any], list[tuple[str, str]]]] = [
        (config_item("AWS::EC2::Volume", VOL), [("disks", VOL)]),
        (config_item("AWS::EC2::NetworkInterface", eni), [("network_ports", eni)]),
        (
            config_item(
                "AWS::EC2::NetworkInterface",
                eni,
                [
                    {
                        "resourceId": SG,
                        "resourceType": "AWS::EC2::SecurityGroup",
                        "name": "Is associated with SecurityGroup",
                    },
                    {**ATTACHED, "resourceId": VM},
                ],
            ),
            [("vms", VM)],
        ),
        (  # a multi-attach io2 volume: every vm it is attached to
            config_item(
                "AWS::EC2::Volume",
                VOL,
                [
                    {**ATTACHED, "resourceId": VM},
                    {**ATTACHED, "resourceId": other},
                    {**ATTACHED, "resourceId": VM},
                    "junk",
                ],
            ),
            [("vms", VM), ("vms", other)],
        ),
        (config_item("AWS::EC2::Instance", VM, [{**ATTACHED, "resourceId": other}]), [("vms", VM)]),
        (config_item("AWS::S3::Bucket", "example-bucket"), []),
        (config_item("AWS::EC2::Subnet", "subnet-0a1b2c3d4e5f60789"), []),
    ]
    for message, expected in cases:
        assert refs(map_event("m", plain(message))) == expected


def test_an_oversized_volume_has_no_relationships_and_maps_to_the_disk() -> None:
    message = document("config_oversized_instance")
    message["configurationItemSummary"].update(resourceType="AWS::EC2::Volume", resourceId=VOL)
    assert refs(map_event("m", plain(message))) == [("disks", VOL)]


def test_other_config_messages_ask_for_nothing() -> None:
    for message_type in ("ComplianceChangeNotification", "ConfigRulesEvaluationStarted"):
        message = document("config_instance_update")
        message["messageType"] = message_type
        assert map_event("m", plain(message)) == []
        event = document("eventbridge_config_network_interface_change")
        event["detail"]["messageType"] = message_type
        assert map_event("m", plain(event)) == []


# -- malformed events ----------------------------------------------------------------


def broken(name: str, path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """Fixture ``name`` with the member at ``path`` set to ``value`` (``...``: removed)."""
    data = copy.deepcopy(document(name))
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


MALFORMED: list[tuple[Any, str]] = [
    ("not an object", r"data is not a JSON object \(str 'not an object'\)"),
    (None, r"data is not a JSON object \(missing\)"),
    ([document("ec2_state_change_running")], r"data is not a JSON object \(an array\)"),
    (b'{"detail-type": "x"}', r"data is not a JSON object \(bytes"),
    ({"Records": []}, r"neither an EventBridge event \(no 'detail-type'\) nor an AWS Config"),
    (broken("ec2_state_change_running", ("detail-type",), 5), r"detail-type is int 5"),
    (broken("ec2_state_change_running", ("detail",), ...), r"detail is not an object \(missing\)"),
    (
        broken("ec2_state_change_running", ("detail", "instance-id"), ...),
        r"EC2 Instance State-change Notification '7bf73129-.*': detail.instance-id is not an id "
        r"\(missing\)",
    ),
    (broken("ec2_state_change_running", ("detail", "instance-id"), 42), r"instance-id .*int 42"),
    (broken("ec2_state_change_running", ("detail", "instance-id"), ""), r"instance-id .*str ''"),
    (
        broken("cloudtrail_run_instances", ("detail",), "x"),
        r"AWS API Call via CloudTrail .*: detail is not an object \(str",
    ),
    (broken("cloudtrail_run_instances", ("detail",), None), r"detail is not an object \(missing\)"),
    (broken("cloudtrail_run_instances", ("detail", "eventSource"), ...), r"eventSource is missing"),
    (broken("config_instance_update", ("messageType",), 3), r"messageType is int 3"),
    (
        broken("config_instance_update", ("configurationItem",), ...),
        r"ConfigurationItemChangeNotification without a configurationItem object \(missing\)",
    ),
    (
        broken("config_instance_update", ("configurationItem", "resourceType"), ...),
        r"configurationItem.resourceType is missing",
    ),
    (
        broken("config_instance_update", ("configurationItem", "resourceId"), 7),
        r"configurationItem.resourceId is int 7",
    ),
    (
        broken("config_oversized_instance", ("configurationItemSummary",), []),
        r"without a configurationItemSummary object \(an array\)",
    ),
    (
        broken("eventbridge_config_network_interface_change", ("detail", "messageType"), ...),
        r"Config Configuration Item Change 'c3d4e5f6-.*': detail: messageType is missing",
    ),
]


@pytest.mark.parametrize(("data", "reason"), MALFORMED)
def test_malformed_events_raise_a_precise_value_error(data: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        map_event("m", plain(data))


# -- property: anything a CloudTrail call can carry ------------------------------------

ID_LIKE = st.sampled_from([VM, VOL, SG, "ami-01", "eni-01", "i-", "subnet-1", "pg-1", ""])
KEYS = st.sampled_from(
    [
        "instanceId",
        "imageId",
        "groupId",
        "volumeId",
        "networkInterfaceId",
        "resourceId",
        "InstanceIds",
        "items",
        "instancesSet",
        "groupSet",
        "resourcesSet",
        "x",
    ]
) | st.text(max_size=8)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | ID_LIKE | st.text(max_size=8)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(request=JSONISH, response=JSONISH, detail=JSONISH, data=JSONISH)
def test_any_payload_gives_targets_of_known_collections_or_a_value_error(
    request: Any, response: Any, detail: Any, data: Any
) -> None:
    wrapped = cloudtrail(request, response)
    odd_detail = {**cloudtrail(), "detail": detail}
    for candidate in (wrapped, odd_detail, data, {"detail-type": data}, {"messageType": data}):
        try:
            targets = map_event("m", plain(candidate))
        except ValueError:
            continue
        assert isinstance(targets, list)
        for target in targets:
            assert isinstance(target, Target) and target.manager == "m"
            assert target.association in COLLECTIONS or target.is_full


# -- account_region ------------------------------------------------------------------

EAST = ("123456789012", "us-east-1")
WEST = ("210987654321", "eu-west-1")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_account_region_of_each_fixture(name: str) -> None:
    other = {"cloudtrail_attach_network_interface", "eventbridge_config_network_interface_change"}
    expected = None if name == "config_snapshot_delivery_completed" else EAST
    expected = WEST if name in other else expected
    assert account_region(plain(document(name))) == expected


def test_account_region_falls_back_to_the_resource_arns() -> None:
    # moto's EventBridge leaves "account" out of the events it delivers
    event = broken("ec2_state_change_running", ("account",), ...)
    assert account_region(plain(event)) == EAST
    event["resources"] = ["not an arn", "arn:aws:ec2:us-west-2:210987654321:instance/i-1"]
    assert account_region(plain(event)) == ("210987654321", "us-east-1")


def test_account_region_is_none_when_the_event_does_not_say() -> None:
    assert account_region(plain("text")) is None
    assert account_region({"id": "x"}) is None
    no_account = broken("ec2_state_change_running", ("account",), ...)
    no_account["resources"] = []
    assert account_region(plain(no_account)) is None
    assert account_region(plain(broken("ec2_state_change_running", ("region",), 3))) is None
    summary = broken("config_oversized_instance", ("configurationItemSummary", "awsRegion"), ...)
    assert account_region(plain(summary)) is None
    assert account_region(plain({"configurationItem": "x"})) is None
