"""Helpers that shape a moto EC2 account for tests: launch, tag, attach, and a faulty front.

moto is the cloud here; these helpers only call its public EC2 API.
:class:`FaultyFront` is an HTTP server put in front of moto that answers
chosen requests with an AWS error (throttling, 5xx, refused credentials) and
forwards the rest: a cloud that misbehaves, as a real one does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.daemon_process import free_port

AMI = "ami-12c6146b"
"""An image of moto's public catalogue."""
OTHER_AMI = "ami-1e749f67"
"""An Ubuntu image of the same catalogue."""
GONE_AMI = "ami-0000000000000dead"
"""An image moto does not have (deregistered, or private to another account)."""


async def launch(
    ec2: Any,
    name: str,
    *,
    count: int = 1,
    instance_type: str = "t3.micro",
    image: str = AMI,
    groups: Sequence[str] = (),
    tags: dict[str, str] | None = None,
) -> list[str]:
    """Run ``count`` instances tagged ``Name=name`` (and ``tags``); their ids."""
    all_tags = [{"Key": "Name", "Value": name}] + [
        {"Key": k, "Value": v} for k, v in (tags or {}).items()
    ]
    params: dict[str, Any] = {
        "ImageId": image,
        "MinCount": count,
        "MaxCount": count,
        "InstanceType": instance_type,
        "TagSpecifications": [{"ResourceType": "instance", "Tags": all_tags}],
    }
    if groups:
        params["SecurityGroupIds"] = list(groups)
    answer = await ec2.run_instances(**params)
    return [i["InstanceId"] for i in answer["Instances"]]


async def security_group(ec2: Any, name: str, description: str = "test group") -> str:
    vpc = (await ec2.describe_vpcs())["Vpcs"][0]["VpcId"]
    answer = await ec2.create_security_group(GroupName=name, Description=description, VpcId=vpc)
    return str(answer["GroupId"])


async def attach_volume(ec2: Any, instance: str, device: str, size: int = 20) -> str:
    zone = (await ec2.describe_instances(InstanceIds=[instance]))["Reservations"][0]["Instances"][
        0
    ]["Placement"]["AvailabilityZone"]
    volume = (await ec2.create_volume(Size=size, AvailabilityZone=zone))["VolumeId"]
    await ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device=device)
    return str(volume)


async def network_interface(ec2: Any, instance: str) -> str:
    return str(
        (await ec2.describe_instances(InstanceIds=[instance]))["Reservations"][0]["Instances"][0][
            "NetworkInterfaces"
        ][0]["NetworkInterfaceId"]
    )


def ec2_error(code: str, status: int) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code>"
        f"<Message>injected {code}</Message></Error></Errors>"
        "<RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>"
    )
    return web.Response(status=status, body=body.encode(), content_type="text/xml")


@dataclass
class FaultyFront:
    """Forwards to ``upstream``; the next ``len(faults)`` requests get those errors instead."""

    upstream: str
    faults: list[tuple[str, int]] = field(default_factory=list)
    always: tuple[str, int] | None = None
    """An error every request gets (refused credentials), when set."""
    requests: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FaultyFront:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession()
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.always is not None:
            return ec2_error(*self.always)
        if self.faults:
            return ec2_error(*self.faults.pop(0))
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with self._session.request(
            request.method,
            f"{self.upstream}{request.path_qs}",
            headers=headers,
            data=await request.read(),
        ) as answer:
            body = await answer.read()
            return web.Response(
                status=answer.status,
                body=body,
                headers={"Content-Type": answer.headers.get("Content-Type", "text/xml")},
            )
