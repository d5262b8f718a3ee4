"""AWS provider figures against moto_server: full refresh time (moto vs refreshd) and API calls.

Flow: moto_server (EC2) -> AwsConnection -> wiring (Refresher, Persister) -> PostgreSQL.

Starts ``moto_server`` on a free loopback port, launches ``--instances``
instances (with tags, a few security groups and an extra volume on some), and
refreshes them into a fresh PostgreSQL database with the real Refresher,
Persister and AwsConnection:

1. a collect-only pass (``collect_full`` without saving): the time the EC2 API
   part takes;
2. the first full refresh, then a second one (nothing changed);
3. targeted refreshes of 1 and of 100 instances (each changed in moto first):
   EC2 requests per refresh and wall time.

For each phase it prints the wall time, the CPU seconds spent by moto_server
(its process) and by this process (refreshd: botocore, parser, persister
client side), and the EC2 requests by operation.  moto runs in Python and is
far slower than EC2, so the refreshd share is the figure to watch.

    .venv/bin/python bench/aws_refresh.py --instances 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from databases import temp_database
from machine import machine_info, print_machine
from processes import BIN, free_port
from resources import process_cpu
from wiring import wired

from daemon.model.targets import Target, TargetCollection
from providers.aws import AwsConnection

MANAGER = "bench-aws"
AMIS = ("ami-12c6146b", "ami-1e749f67", "ami-35e92e4c")
TYPES = ("t3.micro", "t3.large", "m5.large", "c5.xlarge")


class Moto:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def cpu(self) -> float:
        return process_cpu(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


async def populate(ec2: Any, instances: int) -> list[str]:
    vpc = (await ec2.describe_vpcs())["Vpcs"][0]["VpcId"]
    groups = [
        (await ec2.create_security_group(GroupName=f"g{i}", Description="bench", VpcId=vpc))[
            "GroupId"
        ]
        for i in range(5)
    ]
    ids: list[str] = []
    batch = 0
    while len(ids) < instances:
        count = min(100, instances - len(ids))
        answer = await ec2.run_instances(
            ImageId=AMIS[batch % len(AMIS)],
            InstanceType=TYPES[batch % len(TYPES)],
            MinCount=count,
            MaxCount=count,
            SecurityGroupIds=[groups[batch % len(groups)]],
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": "Name", "Value": f"vm-{batch}"}, {"Key": "env", "Value": "b"}],
                }
            ],
        )
        ids.extend(i["InstanceId"] for i in answer["Instances"])
        batch += 1
    for instance in ids[:: max(1, len(ids) // 50)]:  # an extra volume on 2% of them
        volume = (await ec2.create_volume(Size=50, AvailabilityZone="us-east-1a"))["VolumeId"]
        await ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device="/dev/sdf")
    return ids


async def measured(
    label: str, moto: Moto, connection: AwsConnection, work: Callable[[], Awaitable[Any]]
) -> tuple[float, Any]:
    connection.api.calls.clear()
    moto_cpu, own_cpu, t0 = moto.cpu(), time.process_time(), time.perf_counter()
    result = await work()
    wall = time.perf_counter() - t0
    moto_used, own_used = moto.cpu() - moto_cpu, time.process_time() - own_cpu
    calls = dict(connection.api.calls)
    print(
        f"{label:<32} wall {wall:7.3f} s   moto CPU {moto_used:7.3f} s   "
        f"refreshd CPU {own_used:7.3f} s   EC2 requests {sum(calls.values()):4d} {calls}"
    )
    return wall, result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5, help="targeted refreshes per size")
    args = parser.parse_args()
    print_machine(machine_info())
    for name, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}.items():
        os.environ.setdefault(name, value)
    moto = Moto()
    try:
        await run(moto, args.instances, args.repeats)
    finally:
        moto.stop()


async def run(moto: Moto, instances: int, repeats: int) -> None:
    from aiobotocore.session import get_session

    manager = {"provider": "aws", "region": "us-east-1", "endpoint_url": moto.url}
    async with (
        get_session().create_client("ec2", region_name="us-east-1", endpoint_url=moto.url) as ec2,
        temp_database(f"bench_aws_{uuid.uuid4().hex[:8]}") as dsn,
    ):
        t0 = time.perf_counter()
        ids = await populate(ec2, instances)
        print(f"launched {len(ids)} instances in moto in {time.perf_counter() - t0:.1f} s")
        async with wired(dsn, {MANAGER: manager}) as refreshd:
            refresher = refreshd.refresher
            connection: AwsConnection = refreshd.connection(MANAGER)
            full = TargetCollection(MANAGER, [Target.full(MANAGER)])

            async def collect_only() -> int:
                return sum([len(p) async for p in connection.collect_full()])

            _, rows = await measured("collect only (no save)", moto, connection, collect_only)
            print(f"{'':<32} {rows} rows collected")
            for label in ("full refresh (first)", "full refresh (no change)"):
                _, result = await measured(label, moto, connection, lambda: refresher.refresh(full))
                print(f"{'':<32} {result.rows_written} rows written")
            for size in (1, 100):
                walls: list[float] = []
                per_call: Counter[int] = Counter()
                for repeat in range(repeats):
                    chosen = ids[repeat : repeat + size]
                    await ec2.create_tags(
                        Resources=chosen, Tags=[{"Key": "rev", "Value": str(repeat)}]
                    )
                    targets = TargetCollection(
                        MANAGER, [Target.of(MANAGER, "vms", i) for i in chosen]
                    )
                    wall, _ = await measured(
                        f"targeted {size} instance(s) #{repeat + 1}",
                        moto,
                        connection,
                        lambda targets=targets: refresher.refresh(targets),  # type: ignore[misc]
                    )
                    walls.append(wall)
                    per_call[connection.api.total_calls] += 1
                print(
                    f"targeted {size}: p50 {statistics.median(walls) * 1000:.0f} ms, "
                    f"EC2 requests per refresh {dict(per_call)}"
                )


if __name__ == "__main__":
    asyncio.run(main())
