"""The AWS provider against a real EC2 API (moto_server on loopback), saved by the real persister.

Every test runs on SQLite and on PostgreSQL and checks the rows a user would
query, plus the EC2 requests a targeted refresh sends (never a listing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.provider import ProviderAuthError, ProviderError
from daemon.model.targets import Target, TargetCollection
from daemon.persistence import schema
from daemon.persistence.refresh_result import RefreshResult
from daemon.pipeline.refresher import Refresher
from daemon.service.composition import assemble
from daemon.service.config import parse_config
from providers.aws import AwsConnection, AwsSettings
from tests.aws_cloud import (
    AMI,
    GONE_AMI,
    OTHER_AMI,
    FaultyFront,
    attach_volume,
    launch,
    network_interface,
    security_group,
)
from tests.cloud_state import database_state
from tests.fixtures.moto_server import AwsClients, MotoServer

MANAGER = "aws-test"

LISTINGS = {"describe_instances", "describe_volumes", "describe_network_interfaces"}


@dataclass
class Harness:
    engine: AsyncEngine
    connection: AwsConnection
    refresher: Refresher
    ec2: Any

    async def full(self) -> RefreshResult:
        return await self.refresher.refresh(TargetCollection(MANAGER, [Target.full(MANAGER)]))

    async def targeted(self, *targets: tuple[str, str]) -> RefreshResult:
        collection = TargetCollection(MANAGER, [Target.of(MANAGER, a, r) for a, r in targets])
        return await self.refresher.refresh(collection)

    async def state(self) -> dict[str, dict[Any, Any]]:
        return await database_state(self.engine, MANAGER)

    def calls(self) -> dict[str, int]:
        return dict(self.connection.api.calls)


def settings(moto: MotoServer, **overrides: Any) -> AwsSettings:
    return AwsSettings(**{"region": moto.region, "endpoint_url": moto.endpoint_url, **overrides})


@asynccontextmanager
async def assembled(
    engine: AsyncEngine, moto: MotoServer, **overrides: Any
) -> AsyncIterator[tuple[Refresher, AwsConnection]]:
    """Manager MANAGER of provider aws on ``moto`` (with ``overrides``), as the daemon
    builds it: its refresher and its open connection."""
    manager = {"name": MANAGER, "provider": "aws", "region": moto.region}
    manager |= {"endpoint_url": moto.endpoint_url, **overrides}
    async with assemble(parse_config({"managers": [manager]}), engine=engine) as parts:
        connection = parts.connection(MANAGER)
        assert isinstance(connection, AwsConnection)
        yield parts.refresher, connection


@pytest.fixture
async def aws(
    moto: MotoServer, aws_client: AwsClients, engine: AsyncEngine
) -> AsyncIterator[Harness]:
    async with assembled(engine, moto) as (refresher, connection), aws_client("ec2") as ec2:
        yield Harness(engine, connection, refresher, ec2)


async def test_full_refresh_saves_the_account_and_a_second_one_writes_nothing(
    aws: Harness,
) -> None:
    web = await security_group(aws.ec2, "web", "web servers")
    [a, b] = await launch(aws.ec2, "app", count=2, groups=[web], tags={"team": "blue"})
    [c] = await launch(aws.ec2, "db", instance_type="m5.large", image=OTHER_AMI)
    data = await attach_volume(aws.ec2, c, "/dev/sdf", size=100)

    first = await aws.full()
    state = await aws.state()

    assert set(state["vms"]) == {a, b, c}
    assert state["vms"][a]["name"] == "app"
    assert state["vms"][a]["state"] in {"pending", "running"}
    assert state["vms"][a]["flavor"] == "t3.micro"
    assert state["vms"][a]["image"] == AMI
    assert state["vms"][a]["tags"] == {"Name": "app", "team": "blue"}
    assert state["vms"][a]["extra"]["placement"]["AvailabilityZone"].startswith("us-east-1")
    assert state["vms"][c]["flavor"] == "m5.large"
    assert state["flavors"]["t3.micro"]["cpus"] == 2
    assert state["flavors"]["t3.micro"]["memory_mb"] == 1024
    assert state["flavors"]["m5.large"]["memory_mb"] == 8192
    assert {AMI, OTHER_AMI} <= set(state["images"])
    assert state["images"][AMI]["name"] != AMI  # the image was fetched, not a skeletal row
    assert state["security_groups"][web]["name"] == "web"
    assert (a, web) in state["vm_security_groups"]
    assert (c, web) not in state["vm_security_groups"]
    disks = {key: row for key, row in state["disks"].items() if key[0] == c}
    assert set(disks) == {(c, "/dev/sda1"), (c, "/dev/sdf")}
    assert disks[(c, "/dev/sdf")]["size_gb"] == 100
    assert disks[(c, "/dev/sdf")]["extra"]["volume_id"] == data
    eni = await network_interface(aws.ec2, a)
    port = state["network_ports"][(a, eni)]
    assert port["mac_address"] and port["ip_address"]
    assert first.rows_written == sum(len(rows) for rows in state.values())

    second = await aws.full()
    assert second.rows_written == 0
    assert await aws.state() == state


async def test_targeted_refresh_updates_only_its_instance_with_a_few_requests(
    aws: Harness,
) -> None:
    [a, b] = await launch(aws.ec2, "app", count=2)
    await aws.full()
    before = await aws.state()
    await aws.ec2.create_tags(Resources=[a, b], Tags=[{"Key": "Name", "Value": "renamed"}])
    await aws.ec2.stop_instances(InstanceIds=[a])
    await attach_volume(aws.ec2, a, "/dev/sdg", size=42)
    aws.connection.api.calls.clear()

    result = await aws.targeted(("vms", a))

    state = await aws.state()
    assert state["vms"][a]["name"] == "renamed"
    assert state["vms"][a]["state"] in {"stopping", "stopped"}
    assert state["disks"][(a, "/dev/sdg")]["size_gb"] == 42
    assert state["vms"][b] == before["vms"][b]  # b changed in the cloud but was not targeted
    written = result.details()
    assert written["vms"] == {"updated": 1}
    assert written["disks"] == {"created": 1}
    assert set(written) <= {"vms", "disks", "network_ports"}  # a stopped vm loses its public IP
    calls = aws.calls()
    assert sum(calls.values()) <= 5, calls
    assert "get_caller_identity" not in calls  # learnt once, when the connection opened


async def test_targeted_request_count_does_not_grow_with_the_targets(aws: Harness) -> None:
    ids = await launch(aws.ec2, "many", count=30)
    await aws.full()
    aws.connection.api.calls.clear()
    await aws.targeted(("vms", ids[0]))
    one = aws.calls()
    aws.connection.api.calls.clear()
    await aws.targeted(*[("vms", i) for i in ids])
    thirty = aws.calls()
    assert one == thirty
    assert set(one) <= {
        "describe_instances",
        "describe_volumes",
        "describe_images",
        "describe_instance_types",
        "describe_security_groups",
    }


async def test_terminated_and_unknown_instances_are_archived(aws: Harness) -> None:
    [a, b] = await launch(aws.ec2, "app", count=2)
    await aws.full()
    await aws.ec2.terminate_instances(InstanceIds=[a])

    result = await aws.targeted(("vms", a), ("vms", "i-00000000000000000"))

    state = await aws.state()
    assert set(state["vms"]) == {b}
    assert not [key for key in state["disks"] if key[0] == a]
    assert result.total.archived == 1
    async with aws.engine.connect() as conn:
        archived = (
            await conn.execute(select(schema.vms.c.archived_at).where(schema.vms.c.ems_ref == a))
        ).scalar_one()
    assert archived is not None


async def test_keep_terminated_keeps_the_vm_in_state_terminated(
    moto: MotoServer, aws_client: AwsClients, engine: AsyncEngine
) -> None:
    async with (
        assembled(engine, moto, keep_terminated=True) as (refresher, _),
        aws_client("ec2") as ec2,
    ):
        [a] = await launch(ec2, "app")
        await ec2.terminate_instances(InstanceIds=[a])
        await refresher.refresh(TargetCollection(MANAGER, [Target.full(MANAGER)]))
        state = await database_state(engine, MANAGER)
    assert state["vms"][a]["state"] == "terminated"


async def test_an_instance_created_after_the_full_refresh_is_created_by_a_targeted_one(
    aws: Harness,
) -> None:
    await launch(aws.ec2, "old")
    await aws.full()
    group = await security_group(aws.ec2, "late")
    [new] = await launch(aws.ec2, "new", instance_type="c5.xlarge", image=OTHER_AMI, groups=[group])

    await aws.targeted(("vms", new))

    state = await aws.state()
    assert state["vms"][new]["name"] == "new"
    assert state["flavors"]["c5.xlarge"]["cpus"] == 4
    assert state["images"][OTHER_AMI]["name"] != OTHER_AMI
    assert state["security_groups"][group]["name"] == "late"
    assert (new, group) in state["vm_security_groups"]
    assert [key for key in state["disks"] if key[0] == new]


async def test_a_volume_target_refreshes_the_vm_it_is_attached_to(aws: Harness) -> None:
    [a] = await launch(aws.ec2, "app")
    old = await attach_volume(aws.ec2, a, "/dev/sdf")
    await aws.full()
    await aws.ec2.detach_volume(VolumeId=old, InstanceId=a)
    new = await attach_volume(aws.ec2, a, "/dev/sdh", size=7)

    # the event named only the new volume: the collector finds its instance
    await aws.targeted(("disks", new))

    disks = {key[1]: row for key, row in (await aws.state())["disks"].items() if key[0] == a}
    assert set(disks) == {"/dev/sda1", "/dev/sdh"}  # the detached one is gone too
    assert disks["/dev/sdh"]["size_gb"] == 7
    assert "describe_instances" in aws.calls()


async def test_a_network_interface_target_refreshes_its_vm(aws: Harness) -> None:
    [a] = await launch(aws.ec2, "app")
    eni = await network_interface(aws.ec2, a)
    # never refreshed before: the database cannot resolve the interface, the collector does
    await aws.targeted(("network_ports", eni))
    state = await aws.state()
    assert a in state["vms"]
    assert (a, eni) in state["network_ports"]


async def test_throttling_and_server_errors_are_retried(
    moto: MotoServer, engine: AsyncEngine, aws_client: AwsClients
) -> None:
    async with (
        FaultyFront(moto.endpoint_url) as front,
        assembled(engine, moto, endpoint_url=front.url) as (refresher, _),
        aws_client("ec2") as ec2,
    ):
        [a] = await launch(ec2, "app")
        front.faults = [("RequestLimitExceeded", 503), ("InternalError", 500), ("Unavailable", 503)]
        await refresher.refresh(TargetCollection(MANAGER, [Target.full(MANAGER)]))
        assert not front.faults
        assert a in (await database_state(engine, MANAGER))["vms"]


async def test_exhausted_retries_fail_the_refresh_as_retryable(
    moto: MotoServer, engine: AsyncEngine
) -> None:
    async with (
        FaultyFront(moto.endpoint_url) as front,
        assembled(engine, moto, endpoint_url=front.url, max_attempts=2) as (refresher, conn),
    ):
        front.always = ("RequestLimitExceeded", 503)
        with pytest.raises(ProviderError, match="RequestLimitExceeded") as failure:
            await refresher.refresh(TargetCollection(MANAGER, [Target.full(MANAGER)]))
    assert failure.value.retryable
    assert getattr(failure.value, "retry_after", 0) > 0
    # max_attempts = 2 (the account was looked up before the throttling began)
    assert conn.api.calls == {"get_caller_identity": 1, "describe_security_groups": 2}


async def test_refused_credentials_fail_clearly_and_are_recorded(
    moto: MotoServer, engine: AsyncEngine
) -> None:
    async with (
        FaultyFront(moto.endpoint_url) as front,
        assembled(engine, moto, endpoint_url=front.url) as (refresher, conn),
    ):
        front.always = ("AuthFailure", 401)
        with pytest.raises(ProviderAuthError, match="AuthFailure") as failure:
            await refresher.refresh(TargetCollection(MANAGER, [Target.of(MANAGER, "vms", "i-1")]))
    assert not failure.value.retryable
    assert conn.api.calls["describe_instances"] == 1  # not retried
    async with engine.connect() as c:
        error = (
            await c.execute(
                select(schema.managers.c.last_refresh_error).where(
                    schema.managers.c.name == MANAGER
                )
            )
        ).scalar_one()
    assert "AuthFailure" in error


async def test_the_account_is_learnt_for_event_routing(moto: MotoServer) -> None:
    async with AwsConnection(MANAGER, settings(moto)) as connection:
        assert connection.account_region == ("123456789012", "us-east-1")
        assert connection.api.calls == {"get_caller_identity": 1}
    async with AwsConnection(MANAGER, settings(moto, account_id="000011112222")) as connection:
        assert connection.account_region == ("000011112222", "us-east-1")
        assert not connection.api.calls


async def test_refused_credentials_do_not_stop_the_connection_from_opening(
    moto: MotoServer,
) -> None:
    async with FaultyFront(moto.endpoint_url, always=("InvalidClientTokenId", 403)) as front:
        async with AwsConnection(MANAGER, settings(moto, endpoint_url=front.url)) as connection:
            assert connection.account_region is None  # learnt at a later refresh: logged
        assert front.requests == 1


def test_settings_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="region"):
        AwsSettings(region="mars")
    with pytest.raises(ValueError, match="account_id"):
        AwsSettings(region="us-east-1", account_id="12")
    with pytest.raises(ValueError, match="ids_per_request"):
        AwsSettings(region="us-east-1", ids_per_request=500)
    with pytest.raises(ValueError, match="extra"):
        AwsSettings(region="us-east-1", acess_key="x")  # type: ignore[call-arg]


async def test_an_image_the_api_does_not_show_is_kept_as_a_reference(aws: Harness) -> None:
    [a] = await launch(aws.ec2, "app", image=GONE_AMI)
    await aws.full()
    state = await aws.state()
    # the vm still says what it runs; the image itself is archived (docs/design.md, Known edges)
    assert state["vms"][a]["image"] == GONE_AMI
    assert GONE_AMI not in state["images"]
    assert (await aws.full()).rows_written == 0
