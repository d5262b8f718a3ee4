"""End to end on AWS: moto (EC2, EventBridge, SQS) -> SQS or Kafka -> `refreshd run` -> PostgreSQL.

The cloud is moto_server on loopback; the daemon runs as a subprocess with one
AWS manager whose periodic full refresh is 24 h away, so after its start-up
full refresh only targeted refreshes (driven by the events) can bring the
database to the cloud's state.  Instances are started, stopped, terminated
and launched in moto, and the matching EventBridge events are put:

* through SQS: an EventBridge rule in moto sends them to a queue (moto
  delivers the event JSON as the message body, like EventBridge does);
* through Kafka: the same EventBridge JSON as the record value, the shape an
  EventBridge -> Kafka connector writes, routed by account and region.

What is asserted is what a user sees: vms in PostgreSQL, the queue drained
(messages deleted only after their refresh), the committed Kafka offset.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.persistence import schema
from daemon.persistence.db import create_engine
from tests.aws_cloud import FaultyFront, launch
from tests.daemon_process import DaemonProcess, free_port, wait_for, write_config
from tests.fixtures.moto_server import AwsClients, MotoServer
from tests.test_e2e_kafka import CATCHER_OPTIONS, committed_offset

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

MANAGER = "aws-e2e"
STATE_CHANGE = "EC2 Instance State-change Notification"
TIMEOUT = 60.0


def state_change(moto: MotoServer, instance: str, state: str) -> dict[str, Any]:
    """An EventBridge EC2 state-change event as AWS publishes it."""
    return {
        "version": "0",
        "id": f"{instance}-{state}",
        "detail-type": STATE_CHANGE,
        "source": "aws.ec2",
        "account": moto.account,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": moto.region,
        "resources": [f"arn:aws:ec2:{moto.region}:{moto.account}:instance/{instance}"],
        "detail": {"instance-id": instance, "state": state},
    }


@dataclass
class Env:
    moto: MotoServer
    ec2: Any
    engine: AsyncEngine
    daemon: DaemonProcess

    async def vms(self) -> dict[str, str | None]:
        """Active vms: ems_ref -> state."""
        t = schema.vms
        async with self.engine.connect() as conn:
            active = select(t.c.ems_ref, t.c.state).where(t.c.archived_at.is_(None))
            rows = await conn.execute(active)
            return {row.ems_ref: row.state for row in rows}

    async def wait_vms(self, expected: dict[str, set[str]], what: str) -> None:
        """Wait until the active vms are exactly ``expected`` (ems_ref -> allowed states)."""

        async def matches() -> bool:
            vms = await self.vms()
            return set(vms) == set(expected) and all(vms[k] in v for k, v in expected.items())

        try:
            await wait_for(matches, timeout=TIMEOUT, interval=0.2, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; database has {await self.vms()}") from None

    async def cloud_changes(self, ids: list[str]) -> tuple[dict[str, Any], dict[str, set[str]]]:
        """Stop ids[0], terminate ids[1], launch one more: the events and the expected vms."""
        stopped, terminated, kept = ids
        await self.ec2.stop_instances(InstanceIds=[stopped])
        await self.ec2.terminate_instances(InstanceIds=[terminated])
        [new] = await launch(self.ec2, "late")
        events = {
            stopped: state_change(self.moto, stopped, "stopped"),
            terminated: state_change(self.moto, terminated, "terminated"),
            new: state_change(self.moto, new, "pending"),
        }
        expected = {
            stopped: {"stopping", "stopped"},
            kept: {"pending", "running"},
            new: {"pending", "running"},
        }
        return events, expected


@pytest.fixture
async def aws_env(
    tmp_path: Path, pg_url: str, moto: MotoServer, aws_client: AwsClients
) -> AsyncIterator[Any]:
    engines: list[AsyncEngine] = []
    daemons: list[DaemonProcess] = []

    async def make(ec2: Any, catcher: dict[str, Any], endpoint_url: str | None = None) -> Env:
        port = free_port()
        config = write_config(
            tmp_path / "refreshd.toml",
            {
                "database_url": pg_url,
                "status_interval": "60s",
                "http": {"listen": f"127.0.0.1:{port}"},
                "batching": {"debounce": "50ms", "max_delay": "500ms"},
                "managers": [
                    {
                        "name": MANAGER,
                        "provider": "aws",
                        "region": moto.region,
                        "endpoint_url": endpoint_url or moto.endpoint_url,
                        "refresh_interval": "24h",
                    }
                ],
                "catchers": [catcher],
            },
        )
        daemon = DaemonProcess(
            config,
            http_port=port,
            log_path=tmp_path / "refreshd.log",
            env={"REFRESHD_DATABASE_URL": pg_url, **moto.env},
        )
        daemons.append(daemon)
        engine = create_engine(pg_url)
        engines.append(engine)
        return Env(moto, ec2, engine, daemon)

    try:
        yield make
    finally:
        for daemon in daemons:
            if daemon.alive():
                daemon.stop()
            print("---- refreshd log (tail) ----\n" + daemon.log()[-6000:])
        for engine in engines:
            await engine.dispose()


async def queue_with_rule(sqs: Any, events: Any) -> str:
    """A queue (with a dead-letter queue) that an EventBridge rule for EC2 events feeds."""
    dlq = (await sqs.create_queue(QueueName="refreshd-dlq"))["QueueUrl"]
    dlq_arn = (await sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"]))[
        "Attributes"
    ]["QueueArn"]
    queue = (
        await sqs.create_queue(
            QueueName="refreshd-events",
            Attributes={
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3})
            },
        )
    )["QueueUrl"]
    arn = (await sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"]))[
        "Attributes"
    ]["QueueArn"]
    await events.put_rule(
        Name="ec2-to-refreshd",
        EventPattern=json.dumps({"source": ["aws.ec2"], "detail-type": [STATE_CHANGE]}),
    )
    await events.put_targets(Rule="ec2-to-refreshd", Targets=[{"Id": "refreshd", "Arn": arn}])
    return str(queue)


async def queue_depth(sqs: Any, queue: str) -> int:
    attributes = (
        await sqs.get_queue_attributes(
            QueueUrl=queue,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


async def test_eventbridge_to_sqs_to_refreshd_to_postgresql(
    aws_env: Any, aws_client: AwsClients, moto: MotoServer
) -> None:
    async with aws_client("ec2") as ec2, aws_client("sqs") as sqs, aws_client("events") as bus:
        queue = await queue_with_rule(sqs, bus)
        ids = await launch(ec2, "app", count=3)
        env: Env = await aws_env(
            ec2,
            {
                "type": "sqs",
                "name": "sqs-e2e",
                "queue_url": queue,
                "region": moto.region,
                "endpoint_url": moto.endpoint_url,
                "wait_time": "1s",
                "visibility_timeout": "10s",
                "manager_by_account": True,  # moto's events carry the account in their ARNs
            },
        )
        env.daemon.start()
        await env.daemon.wait_ready()
        await env.wait_vms({i: {"pending", "running"} for i in ids}, "the start-up full refresh")

        events, expected = await env.cloud_changes(ids)
        answer = await bus.put_events(
            Entries=[
                {
                    "Source": e["source"],
                    "DetailType": e["detail-type"],
                    "Detail": json.dumps(e["detail"]),
                    "Resources": e["resources"],
                }
                for e in events.values()
            ]
        )
        assert answer["FailedEntryCount"] == 0

        await env.wait_vms(expected, "the events to reach the database through SQS")

        async def drained() -> bool:
            return await queue_depth(sqs, queue) == 0

        await wait_for(drained, timeout=TIMEOUT, interval=0.2, what="every message deleted")
        assert await env.daemon.metric("refreshd_refreshes_total", {"kind": "targeted"}) >= 1


@pytest.mark.kafka
async def test_eventbridge_json_through_kafka_to_postgresql(
    aws_env: Any,
    aws_client: AwsClients,
    moto: MotoServer,
    kafka_bootstrap: str,
    kafka_topic_factory: Any,
    kafka_group_id: str,
) -> None:
    topic = await kafka_topic_factory()
    async with aws_client("ec2") as ec2:
        ids = await launch(ec2, "app", count=3)
        env: Env = await aws_env(
            ec2,
            {
                "type": "kafka",
                "name": "kafka-aws",
                "bootstrap_servers": kafka_bootstrap,
                "topics": [topic],
                "group_id": kafka_group_id,
                "manager_by_account": True,
                **CATCHER_OPTIONS,
            },
        )
        env.daemon.start()
        await env.daemon.wait_ready()
        await env.wait_vms({i: {"pending", "running"} for i in ids}, "the start-up full refresh")

        events, expected = await env.cloud_changes(ids)
        # an EventBridge event of a kind refreshd does not refresh from: skipped, not dead-lettered
        other = state_change(moto, ids[2], "running") | {
            "id": "spot-warning",
            "detail-type": "EC2 Spot Instance Interruption Warning",
            "detail": {"instance-id": ids[2], "instance-action": "terminate"},
        }
        records = [other, *events.values()]
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for event in records:
                await producer.send_and_wait(topic, json.dumps(event).encode())
        finally:
            await producer.stop()

        await env.wait_vms(expected, "the events to reach the database through Kafka")

        async def all_committed() -> bool:
            return await committed_offset(kafka_bootstrap, kafka_group_id, topic) == len(records)

        await wait_for(all_committed, timeout=TIMEOUT, interval=0.25, what="offsets committed")
        assert await env.daemon.metric("refreshd_events_skipped_total") == 1
        assert await env.daemon.metric("refreshd_events_dead_lettered_total") == 0
        assert await env.daemon.metric("refreshd_events_received_total") == len(records)


async def test_refused_credentials_fail_that_manager_not_the_daemon(
    aws_env: Any, aws_client: AwsClients, moto: MotoServer
) -> None:
    async with (
        aws_client("ec2") as ec2,
        aws_client("sqs") as sqs,
        FaultyFront(moto.endpoint_url, always=("AuthFailure", 401)) as front,
    ):
        queue = (await sqs.create_queue(QueueName="unused"))["QueueUrl"]
        dlq = (await sqs.create_queue(QueueName="unused-dlq"))["QueueUrl"]
        dlq_arn = (await sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"]))[
            "Attributes"
        ]["QueueArn"]
        policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3})
        await sqs.set_queue_attributes(QueueUrl=queue, Attributes={"RedrivePolicy": policy})
        env: Env = await aws_env(
            ec2,
            {
                "type": "sqs",
                "name": "sqs-auth",
                "queue_url": queue,
                "region": moto.region,
                "endpoint_url": moto.endpoint_url,
                "wait_time": "1s",
                "manager": MANAGER,
            },
            endpoint_url=front.url,
        )
        env.daemon.start()
        await env.daemon.wait_ready()

        async def recorded() -> str | None:
            m = schema.managers
            async with env.engine.connect() as conn:
                error = await conn.scalar(select(m.c.last_refresh_error).where(m.c.name == MANAGER))
            return error if isinstance(error, str) and "AuthFailure" in error else None

        error = await wait_for(recorded, timeout=TIMEOUT, interval=0.2, what="the auth error")
        assert "AuthFailure" in error
        assert (
            await env.daemon.metric(
                "refreshd_refreshes_total", {"manager": MANAGER, "outcome": "failure"}
            )
            >= 1
        )
        assert env.daemon.alive()
        assert (await env.daemon.get("/healthz"))[0] == 200
        assert "AuthFailure" in env.daemon.log()
