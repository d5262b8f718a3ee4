"""Property: targeted refreshes driven by CloudTrail events keep an AWS account's rows right.

Hypothesis draws a sequence of EC2 operations (launch, stop, start,
terminate, tag, attach, detach and resize volumes, create and tag security
groups).  Each is applied to moto through the EC2 API, and the CloudTrail
event AWS would publish for it (the "AWS API Call via CloudTrail" EventBridge
shape, ids where AWS puts them) goes through the real event mapper
(``providers.aws.events.map_event``) and a targeted refresh of manager ``events``.
After every step, its rows must equal those of manager ``mirror``, which a
full refresh of the same account has just rebuilt.

Compared: vms, disks, network ports, security group links and security
groups in full; flavors and images as far as active vms use them (a targeted
refresh never archives an unused instance type: docs/design.md, Known edges).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.targets import Target, TargetCollection
from daemon.pipeline.refresher import Refresher
from daemon.service.composition import assemble
from daemon.service.config import parse_config
from providers.aws.events import map_event
from tests.aws_cloud import AMI, OTHER_AMI
from tests.cloud_state import State, database_state
from tests.fixtures.moto_server import AwsClients, MotoServer, moto_credentials
from tests.test_convergence import Database, empty_database, migrated

EVENTS = "events"
MIRROR = "mirror"
TYPES = ("t3.micro", "m5.large")
IMAGES = (AMI, OTHER_AMI)
DEVICES = ("/dev/sdf", "/dev/sdg", "/dev/sdh")

pytestmark = pytest.mark.slow


# -- operations ---------------------------------------------------------------------------

Operation = tuple[Any, ...]

operations = st.one_of(
    st.tuples(st.just("launch"), st.sampled_from(TYPES), st.sampled_from(IMAGES), st.booleans()),
    st.tuples(st.sampled_from(["stop", "start", "terminate"]), st.integers(0, 20)),
    st.tuples(st.just("tag"), st.integers(0, 20), st.sampled_from(["a", "b", "c"])),
    st.tuples(st.just("attach"), st.integers(0, 20), st.sampled_from(DEVICES)),
    st.tuples(st.sampled_from(["detach", "resize"]), st.integers(0, 20)),
    st.tuples(st.just("group"), st.sampled_from(["new", "tag"]), st.integers(0, 20)),
)


def cloudtrail(name: str, request: Any = None, response: Any = None) -> dict[str, Any]:
    """The event as the mapper receives it: a plain (non-CloudEvents) EventBridge document."""
    document = {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "AWS API Call via CloudTrail",
        "source": "aws.ec2",
        "account": "123456789012",
        "region": "us-east-1",
        "detail": {
            "eventSource": "ec2.amazonaws.com",
            "eventName": name,
            "requestParameters": request,
            "responseElements": response,
        },
    }
    return {"specversion": None, "id": document["id"], "data": document}


def items(key: str, ids: list[str]) -> dict[str, Any]:
    return {"items": [{key: i} for i in ids]}


@dataclass
class Account:
    """The moto account, and what the operations need to pick their objects."""

    ec2: Any
    instances: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    async def apply(self, op: Operation) -> list[dict[str, Any]]:
        """Apply ``op`` in moto; the CloudTrail events AWS would publish ([] if no-op)."""
        ec2, kind = self.ec2, op[0]
        if kind == "launch":
            _, instance_type, image, grouped = op
            params: dict[str, Any] = {"ImageId": image, "MinCount": 1, "MaxCount": 1}
            params["InstanceType"] = instance_type
            if grouped and self.groups:
                params["SecurityGroupIds"] = [self.groups[-1]]
            [instance] = (await ec2.run_instances(**params))["Instances"]
            self.instances.append(instance["InstanceId"])
            response = {
                "instancesSet": {
                    "items": [
                        {
                            "instanceId": instance["InstanceId"],
                            "imageId": image,
                            "instanceType": instance_type,
                        }
                    ]
                }
            }
            return [cloudtrail("RunInstances", {"instanceType": instance_type}, response)]
        if kind == "group":
            if op[1] == "new" or not self.groups:
                vpc = (await ec2.describe_vpcs())["Vpcs"][0]["VpcId"]
                name = f"g{len(self.groups)}"
                group = (
                    await ec2.create_security_group(GroupName=name, Description="d", VpcId=vpc)
                )["GroupId"]
                self.groups.append(group)
                return [cloudtrail("CreateSecurityGroup", {"groupName": name}, {"groupId": group})]
            group = self.groups[op[2] % len(self.groups)]
            await ec2.create_tags(Resources=[group], Tags=[{"Key": "k", "Value": str(op[2])}])
            return [cloudtrail("CreateTags", {"resourcesSet": items("resourceId", [group])})]
        if kind in ("detach", "resize"):
            if not self.volumes:
                return []
            volume = self.volumes[op[1] % len(self.volumes)]
            if kind == "resize":
                size = 10 + op[1]
                await ec2.modify_volume(VolumeId=volume, Size=size)
                request = {"ModifyVolumeRequest": {"VolumeId": volume, "Size": size}}
                return [cloudtrail("ModifyVolume", request)]  # names the volume only
            answer = await ec2.describe_volumes(VolumeIds=[volume])
            attachments = answer["Volumes"][0].get("Attachments") or []
            if not attachments:
                return []
            attached_to = attachments[0]["InstanceId"]
            await ec2.detach_volume(VolumeId=volume, InstanceId=attached_to)  # moto needs both
            response = {"volumeId": volume, "instanceId": attached_to}
            return [cloudtrail("DetachVolume", {"volumeId": volume}, response)]
        live = await self._live()
        if not live:
            return []
        instance = live[op[1] % len(live)]
        if kind in ("stop", "start", "terminate"):
            await getattr(ec2, f"{kind}_instances")(InstanceIds=[instance])
            name = f"{kind.capitalize()}Instances"
            return [cloudtrail(name, {"instancesSet": items("instanceId", [instance])})]
        if kind == "tag":
            await ec2.create_tags(Resources=[instance], Tags=[{"Key": "Name", "Value": op[2]}])
            return [cloudtrail("CreateTags", {"resourcesSet": items("resourceId", [instance])})]
        assert kind == "attach"
        reservation = (await ec2.describe_instances(InstanceIds=[instance]))["Reservations"][0]
        details = reservation["Instances"][0]
        used = {m["DeviceName"] for m in details.get("BlockDeviceMappings") or ()}
        if op[2] in used:
            return []
        zone = details["Placement"]["AvailabilityZone"]
        volume = (await ec2.create_volume(Size=5, AvailabilityZone=zone))["VolumeId"]
        self.volumes.append(volume)
        await ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device=op[2])
        return [
            cloudtrail("CreateVolume", {"size": 5}, {"volumeId": volume}),
            cloudtrail(
                "AttachVolume", {"volumeId": volume, "instanceId": instance, "device": op[2]}
            ),
        ]

    async def _live(self) -> list[str]:
        if not self.instances:
            return []
        answer = await self.ec2.describe_instances(InstanceIds=self.instances)
        return [
            i["InstanceId"]
            for r in answer["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ]


# -- comparison ---------------------------------------------------------------------------


def comparable(state: State) -> State:
    """The state without unused flavors and images (see the module docstring)."""
    used_flavors = {v["flavor"] for v in state["vms"].values()}
    used_images = {v["image"] for v in state["vms"].values()}
    return state | {
        "flavors": {k: v for k, v in state["flavors"].items() if k in used_flavors},
        "images": {k: v for k, v in state["images"].items() if k in used_images},
    }


# -- harness ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database(
    moto_process: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    """A migrated SQLite database for the module (hypothesis examples share it)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('aws-convergence') / 'refreshd.db'}"
    with moto_credentials(), migrated(url) as database:
        yield database


@dataclass
class Harness:
    account: Account
    refresher: Refresher
    engine: AsyncEngine

    async def refresh(self, manager: str, targets: list[Target]) -> None:
        await self.refresher.refresh(TargetCollection(manager, targets))

    async def assert_converged(self, context: str) -> None:
        await self.refresh(MIRROR, [Target.full(MIRROR)])
        events = comparable(await database_state(self.engine, EVENTS))
        mirror = comparable(await database_state(self.engine, MIRROR))
        for collection in mirror:
            assert events[collection] == mirror[collection], f"{context}: {collection} differ"


@asynccontextmanager
async def harness(engine: AsyncEngine, moto: MotoServer) -> AsyncIterator[Harness]:
    moto.reset()
    await empty_database(engine)
    aws = {"provider": "aws", "region": moto.region, "endpoint_url": moto.endpoint_url}
    loaded = parse_config(
        {
            "persister": {"max_delete_ratio": 1.0},
            "managers": [{"name": name, **aws} for name in (EVENTS, MIRROR)],
        }
    )
    async with (
        assemble(loaded, engine=engine) as parts,
        AwsClients(moto)("ec2", region_name=moto.region) as ec2,
    ):
        yield Harness(Account(ec2), parts.refresher, engine)


@settings(deadline=None, max_examples=8)
@given(ops=st.lists(operations, min_size=1, max_size=10))
def test_targeted_refreshes_of_cloudtrail_events_equal_a_full_refresh(
    database: Database, moto_process: MotoServer, ops: list[Operation]
) -> None:
    async def body() -> None:
        async with harness(database.engine, moto_process) as h:
            await h.account.apply(("launch", TYPES[0], IMAGES[0], False))
            await h.refresh(EVENTS, [Target.full(EVENTS)])
            for step, op in enumerate(ops, 1):
                targets = [
                    target
                    for event in await h.account.apply(op)
                    for target in map_event(EVENTS, event)
                ]
                if targets:
                    await h.refresh(EVENTS, targets)
                await h.assert_converged(f"after step {step}: {op}")

    database.run(body)
