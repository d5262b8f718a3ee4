"""Routing events by their provider's routing key (AWS: account and region), and AWS records
through the Kafka record path.

A manager's key comes from its open connection's ``routing_key`` attribute
(for AWS its ``account_region``); here a plain stand-in object plays the
connection (only that attribute is read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from catchers.cloudevents import CloudEvent, decode_kafka_record
from catchers.kafka.catcher import create
from catchers.kafka.records import EventRejection, map_record
from catchers.kafka.resets import managers_fed
from catchers.routing import (
    ROUTING_OPTIONS,
    DeadLetterReason,
    Route,
    route_by_key,
    route_from_options,
)
from daemon.model.catcher import CatcherContext, ManagerEndpoint
from daemon.model.targets import Target
from providers.awesome_cloud.events import map_event as awesome_map_event
from providers.aws import provider as aws_provider
from providers.aws.events import map_event

FIXTURES = Path(__file__).parent / "fixtures" / "aws_events"
EAST = ("123456789012", "us-east-1")
WEST = ("210987654321", "eu-west-1")


@dataclass
class Identity:
    """Stands in for a connection: the routing key it has resolved (or None)."""

    routing_key: Any


def aws(name: str, account_region: tuple[str, str] | None) -> ManagerEndpoint:
    return ManagerEndpoint.of(name, "aws", aws_provider, Identity(account_region))


def raw(name: str) -> bytes:
    return (FIXTURES / f"{name}.json").read_bytes()


def event_of(name: str) -> CloudEvent:
    (event,) = decode_kafka_record((), raw(name), plain_id="t/0/1", plain_source="kafka:t")
    return event


def by_account(*endpoints: ManagerEndpoint) -> Route:
    return route_from_options({"manager_by_account": True}, {e.name: e for e in endpoints})


def routed_to(route: Route, name: str) -> str | None:
    found = route("t", event_of(name))
    return None if found is None else found[0]


def test_events_go_to_the_manager_of_their_account_and_region() -> None:
    route = by_account(aws("aws-east", EAST), aws("aws-west", WEST))

    for name in ("ec2_state_change_running", "cloudtrail_run_instances", "config_instance_update"):
        assert routed_to(route, name) == "aws-east", name
    for name in (
        "cloudtrail_attach_network_interface",
        "eventbridge_config_network_interface_change",
    ):
        assert routed_to(route, name) == "aws-west", name
    found = route("t", event_of("config_oversized_instance"))
    assert found is not None and found[1] is map_event


def test_the_same_account_in_another_region_is_another_manager() -> None:
    route = by_account(aws("aws-east", EAST), aws("aws-east-2", (EAST[0], "us-east-2")))
    event = json.loads(raw("ec2_state_change_running"))
    event["region"] = "us-east-2"
    (decoded,) = decode_kafka_record((), json.dumps(event).encode(), plain_id="t/0/2")
    assert route("t", decoded) == ("aws-east-2", map_event)
    assert routed_to(route, "ec2_state_change_running") == "aws-east"


def test_unknown_accounts_and_events_without_one_are_unroutable() -> None:
    route = by_account(aws("aws-east", EAST))

    assert routed_to(route, "cloudtrail_attach_network_interface") is None  # WEST
    assert routed_to(route, "config_snapshot_delivery_completed") is None  # says no account
    text = CloudEvent(id="x", source="s", type="t", data="not an object")
    assert route("t", text) is None


def test_a_connection_that_learns_its_account_later_is_found() -> None:
    west = aws("aws-west", None)
    route = by_account(aws("aws-east", EAST), west)
    assert routed_to(route, "cloudtrail_attach_network_interface") is None

    west.connection.routing_key = WEST  # resolved lazily

    assert routed_to(route, "cloudtrail_attach_network_interface") == "aws-west"
    assert routed_to(route, "ec2_state_change_running") == "aws-east"


def test_only_managers_with_a_routing_key_and_a_known_identity_are_candidates() -> None:
    imposter = ManagerEndpoint("sim", "awesome_cloud", awesome_map_event, Identity(EAST))
    no_connection = ManagerEndpoint.of("aws-closed", "aws", aws_provider)
    unhashable = SimpleNamespace(routing_key=list(EAST))
    odd = ManagerEndpoint.of("aws-odd", "aws", aws_provider, unhashable)
    route = by_account(imposter, no_connection, odd)
    assert routed_to(route, "ec2_state_change_running") is None

    route = by_account(imposter, no_connection, odd, aws("aws-east", EAST))
    assert routed_to(route, "ec2_state_change_running") == "aws-east"


def test_any_provider_with_a_routing_key_is_routed_by_it() -> None:
    def by_source(event: dict[str, Any]) -> str | None:
        source = event.get("source")
        return source if isinstance(source, str) and source.startswith("sim:") else None

    sim = ManagerEndpoint("sim", "other", awesome_map_event, Identity("sim:a"), by_source)
    route = by_account(sim, aws("aws-east", EAST))

    event = CloudEvent(id="1", source="sim:a", type="com.awesomecloud.vm.created", subject="v")
    assert route("t", event) == ("sim", awesome_map_event)
    assert route("t", CloudEvent(id="2", source="sim:b", type="x")) is None
    assert routed_to(route, "ec2_state_change_running") == "aws-east"
    assert ManagerEndpoint.of("aws-east", "aws", aws_provider).routing_key is not None


def test_two_managers_of_one_account_and_region_the_first_configured_wins() -> None:
    route = by_account(aws("first", EAST), aws("second", EAST))
    assert routed_to(route, "ec2_state_change_running") == "first"


def test_construction_errors() -> None:
    simulator = ManagerEndpoint("sim", "awesome_cloud", awesome_map_event)
    with pytest.raises(ValueError, match=r"provider routes events by key \(configured: sim"):
        route_from_options({"manager_by_account": True}, {"sim": simulator})
    with pytest.raises(ValueError, match=r"configured: none"):
        route_by_key({})
    managers = {"aws-east": aws("aws-east", EAST), "sim": simulator}
    with pytest.raises(ValueError, match="'manager_by_account' must be true or false, not 'yes'"):
        route_from_options({"manager_by_account": "yes"}, managers)
    with pytest.raises(ValueError, match=r"give exactly one of .*manager_by_account"):
        route_from_options({"manager_by_account": True, "manager": "sim"}, managers)
    with pytest.raises(ValueError, match="give exactly one of"):
        route_from_options({"manager_by_account": False}, managers)
    # false means not chosen: another option routes
    route = route_from_options({"manager_by_account": False, "manager": "sim"}, managers)
    assert routed_to(route, "cloudtrail_attach_network_interface") == "sim"


def test_the_kafka_catcher_takes_the_option() -> None:
    assert "manager_by_account" in ROUTING_OPTIONS
    options = {"bootstrap_servers": "a:9092", "topics": "aws", "group_id": "g"}
    context = CatcherContext(  # the sink is not used before start()
        sink=SimpleNamespace(), managers={"aws-east": aws("aws-east", EAST)}, clock=lambda: 0.0
    )
    assert create({**options, "manager_by_account": True}, context).name == "kafka"
    no_aws = CatcherContext(sink=SimpleNamespace(), managers={}, clock=lambda: 0.0)
    with pytest.raises(ValueError, match="needs a manager whose provider routes events by key"):
        create({**options, "manager_by_account": True}, no_aws)


def test_a_reset_topic_routed_by_key_feeds_every_manager_with_a_routing_key() -> None:
    simulator = ManagerEndpoint("sim", "awesome_cloud", awesome_map_event, Identity(EAST))
    managers = {e.name: e for e in (aws("b-west", WEST), simulator, aws("a-east", EAST))}
    assert managers_fed({"manager_by_account": True}, managers)("t") == ("a-east", "b-west")


# -- end to end through the pure Kafka record path -------------------------------------

TP = TopicPartition("aws-events", 2)


def record(value: bytes | None, offset: int = 11) -> Any:
    return SimpleNamespace(value=value, headers=(), offset=offset, key=None)


def test_kafka_records_of_aws_json_become_targets_of_the_right_manager() -> None:
    route = by_account(aws("aws-east", EAST), aws("aws-west", WEST))

    mapped = map_record(route, TP, record(raw("cloudtrail_attach_volume")))
    assert mapped == ([Target.of("aws-east", "vms", "i-0a1b2c3d4e5f60718")], None)
    assert not isinstance(mapped, EventRejection)
    assert [t.event_id for t in mapped[0]] == ["2b3c4d5e-6f70-4819-a2b3-c4d5e6f70819"]

    mapped = map_record(route, TP, record(raw("cloudtrail_modify_volume")))
    assert mapped == ([Target.of("aws-east", "disks", "vol-0d1e2f3a4b5c6d7e8")], None)

    mapped = map_record(route, TP, record(raw("eventbridge_config_network_interface_change")))
    assert mapped == ([Target.of("aws-west", "vms", "i-0f9e8d7c6b5a49382")], None)

    mapped = map_record(route, TP, record(raw("config_security_group_deleted")))
    assert not isinstance(mapped, EventRejection)
    (target,) = mapped[0]
    assert target == Target.of("aws-east", "security_groups", "sg-0fedcba9876543210")
    assert target.event_id == "config:sg-0fedcba9876543210:1714592702871"


def test_kafka_records_of_unknown_kinds_give_no_targets() -> None:
    route = by_account(aws("aws-east", EAST))
    for name in ("eventbridge_spot_interruption", "cloudtrail_describe_instances_read_only"):
        assert map_record(route, TP, record(raw(name))) == ([], None), name


def test_bad_kafka_records_are_rejected_with_the_reason() -> None:
    route = by_account(aws("aws-east", EAST))
    cases: list[tuple[bytes, DeadLetterReason, str]] = [
        (b"Not JSON at all", DeadLetterReason.UNDECODABLE, "invalid JSON"),
        (
            raw("cloudtrail_attach_network_interface"),
            DeadLetterReason.UNROUTABLE,
            "no manager for event 'aws-events/2/11'",
        ),
        (
            b'{"detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2",'
            b' "account": "123456789012", "region": "us-east-1", "id": "e-1", "detail": {}}',
            DeadLetterReason.MAPPER_ERROR,
            "mapper of manager 'aws-east' raised ValueError: EC2 Instance State-change "
            "Notification 'e-1': detail.instance-id is not an id (missing)",
        ),
    ]
    for value, reason, message in cases:
        rejection = map_record(route, TP, record(value))
        assert isinstance(rejection, EventRejection), value
        assert rejection.reason == reason
        assert rejection.message.startswith(message), rejection.message
