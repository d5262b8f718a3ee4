"""The SQS catcher against a real moto_server, feeding the real Batcher.

The refresh behind the batcher is a gate the test opens: a message still in
the queue (invisible) while its refresh is held, and gone once the gate
opens, proves "deleted only after commit".  Queues, dead-letter queues and
SNS subscriptions are real moto resources; nothing of SQS is mocked.  Every
wait is on a condition under a timeout, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import generate_latest

from catchers.cloudevents import EventMode
from catchers.sqs.catcher import SqsCatcher, SqsCatcherStats, SqsQueueError, create
from catchers.sqs.messages import decode_message
from catchers.wire import DecodeError
from daemon.model.acks import Ack
from daemon.model.catcher import CatcherContext, ManagerEndpoint, load_catcher
from daemon.model.targets import Target, TargetCollection
from daemon.pipeline.batcher import Batcher, BatchingSettings
from daemon.service.metrics import Metrics
from daemon.service.scrape_collectors import CatcherProbe
from providers.awesome_cloud.events import map_event
from tests.daemon_process import wait_for
from tests.fixtures.moto_server import AwsClients, MotoServer

WAIT = 20.0
FAST: dict[str, Any] = {"wait_time": 1, "visibility_timeout": 4, "drain_timeout": 2}


# -- the refresh behind the batcher, and the mappers -------------------------------------------


class GatedRefresh:
    """Records every TargetCollection; each refresh waits until the gate is open.

    ``fail`` refreshes fail (raise) before any is held or succeeds.
    """

    def __init__(self, *, fail: int = 0) -> None:
        self.calls: list[TargetCollection] = []
        self.committed: list[TargetCollection] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = fail

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    async def __call__(self, collection: TargetCollection) -> None:
        self.calls.append(collection)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("the cloud API is down")
        await self.gate.wait()
        self.committed.append(collection)

    def refs(self) -> set[str]:
        return {str(t) for c in self.calls for t in c}

    def committed_refs(self) -> set[str]:
        return {str(t) for c in self.committed for t in c}


def mixed_mapper(manager: str, event: dict[str, Any]) -> list[Target]:
    """AwesomeCloud CloudEvents, or plain JSON ``{"vms": [...]}``."""
    if event["specversion"] is not None:
        return map_event(manager, event)
    data = event["data"]
    if not isinstance(data, dict) or "vms" not in data:
        raise ValueError("plain event without vms")
    return [Target.of(manager, "vms", vm, event_id=event["id"]) for vm in data["vms"]]


def cloud_event(vm: str, *, kind: str = "vm", action: str = "updated") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"evt-{kind}-{vm}",
        "source": "awesome",
        "type": f"com.awesomecloud.{kind}.{action}",
        "subject": vm,
        "time": "2024-05-01T10:00:00Z",
        "data": {"id": vm},
    }


# -- the harness -------------------------------------------------------------------------------


@dataclass
class Harness:
    catcher: SqsCatcher
    batcher: Batcher
    refresh: GatedRefresh

    def stats(self) -> SqsCatcherStats:
        return self.catcher.stats()


@dataclass
class Queues:
    sqs: Any
    moto: MotoServer

    async def create(self, name: str, *, max_receive_count: int | None = 5) -> tuple[str, str]:
        """A queue (with a dead-letter queue ``<name>-dlq`` when max_receive_count is given)."""
        attributes = {}
        dlq = ""
        if max_receive_count is not None:
            dlq = (await self.sqs.create_queue(QueueName=f"{name}-dlq"))["QueueUrl"]
            arn = await self.attribute(dlq, "QueueArn")
            attributes["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receive_count)}
            )
        url = (await self.sqs.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"]
        return url, dlq

    async def send(self, url: str, *bodies: Any) -> None:
        for body in bodies:
            text = body if isinstance(body, str) else json.dumps(body)
            await self.sqs.send_message(QueueUrl=url, MessageBody=text)

    async def attribute(self, url: str, name: str) -> str:
        answer = await self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[name])
        return str(answer["Attributes"][name])

    async def counts(self, url: str) -> tuple[int, int]:
        """(visible, in flight) messages of the queue."""
        answer = await self.sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )
        a = answer["Attributes"]
        visible, in_flight = (
            a["ApproximateNumberOfMessages"],
            a["ApproximateNumberOfMessagesNotVisible"],
        )
        return int(visible), int(in_flight)

    async def empty(self, url: str) -> bool:
        return await self.counts(url) == (0, 0)


async def drained(queues: Queues, url: str, h: Any, *, deleted: int) -> None:
    """Wait until the queue is empty and the catcher has counted its deletes (the queue
    empties when SQS processed a delete, the count moves when the catcher read its answer)."""

    async def done() -> bool:
        return h.stats().deleted >= deleted and await queues.empty(url)

    await wait_for(done, timeout=WAIT, what=f"the queue to empty and {deleted} deletes counted")


@pytest.fixture
async def queues(aws_client: AwsClients, moto: MotoServer) -> AsyncIterator[Queues]:
    async with aws_client("sqs") as sqs:
        yield Queues(sqs, moto)


Make = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make(queues: Queues) -> AsyncIterator[Make]:
    opened: list[Harness] = []

    async def build(
        queue_url: str,
        options: dict[str, Any] | None = None,
        *,
        settings: BatchingSettings | None = None,
        refresh: GatedRefresh | None = None,
        start: bool = True,
    ) -> Harness:
        refresh = refresh or GatedRefresh()
        batcher = Batcher(refresh, settings=settings or BatchingSettings(debounce=0.0))
        batcher.start()
        context = CatcherContext(
            sink=batcher,
            managers={"m": ManagerEndpoint("m", "mixed", mixed_mapper)},
            clock=asyncio.get_running_loop().time,
        )
        all_options = {
            "queue_url": queue_url,
            "endpoint_url": queues.moto.endpoint_url,
            "manager": "m",
            "name": "sqs-test",
            **FAST,
            **(options or {}),
        }
        catcher = create(all_options, context)
        harness = Harness(catcher, batcher, refresh)
        opened.append(harness)
        if start:
            await catcher.start()
        return harness

    yield build
    for h in opened:
        h.refresh.release()
        await h.catcher.close()
        await h.batcher.close(cancel=True)


# -- 1. deleted only after commit --------------------------------------------------------------


async def test_messages_are_deleted_only_after_their_refresh_commits(
    make: Make, queues: Queues
) -> None:
    url, _ = await queues.create("inventory")
    await queues.send(url, *(cloud_event(f"vm-{i}") for i in range(3)))
    h = await make(url, start=False)
    h.refresh.hold()
    await h.catcher.start()

    await wait_for(lambda: len(h.refresh.refs()) == 3, timeout=WAIT, what="the refresh")
    assert h.refresh.refs() == {"m:vms:vm-0", "m:vms:vm-1", "m:vms:vm-2"}
    assert await queues.counts(url) == (0, 3)  # received, invisible, not deleted
    stats = h.stats()
    assert (stats.submitted, stats.deleted, stats.in_flight) == (3, 0, 3)

    h.refresh.release()
    await drained(queues, url, h, deleted=3)
    stats = h.stats()
    assert (stats.acknowledged, stats.deleted, stats.in_flight) == (3, 3, 0)
    assert stats.received == 3  # no message was delivered twice


async def test_several_receive_loops_take_each_message_once(make: Make, queues: Queues) -> None:
    url, _ = await queues.create("inventory")
    vms = [f"vm-{i:02}" for i in range(25)]
    await queues.send(url, *(cloud_event(vm) for vm in vms))

    h = await make(url, {"concurrency": 3, "max_messages": 4})

    await drained(queues, url, h, deleted=25)
    assert h.refresh.committed_refs() == {f"m:vms:{vm}" for vm in vms}
    stats = h.stats()
    assert (stats.received, stats.deleted, stats.in_flight) == (25, 25, 0)


async def test_a_message_asking_for_nothing_is_deleted_at_once(make: Make, queues: Queues) -> None:
    url, _ = await queues.create("inventory")
    h = await make(url)
    h.refresh.hold()

    await queues.send(url, cloud_event("x", kind="region", action="announced"))

    await drained(queues, url, h, deleted=1)
    assert h.refresh.calls == []
    stats = h.stats()
    assert (stats.skipped, stats.deleted, stats.submitted) == (1, 1, 0)


# -- 2. a failed refresh is retried ------------------------------------------------------------


async def test_a_failed_refresh_keeps_the_message_until_the_retry_commits(
    make: Make, queues: Queues
) -> None:
    url, _ = await queues.create("inventory")
    refresh = GatedRefresh(fail=1)
    refresh.hold()
    settings = BatchingSettings(debounce=0.0, retry_initial=0.2, retry_jitter=0.0)
    h = await make(url, settings=settings, refresh=refresh)

    await queues.send(url, cloud_event("vm-1"))

    await wait_for(lambda: len(refresh.calls) == 2, timeout=WAIT, what="the retry")
    assert await queues.counts(url) == (0, 1)  # the failure deleted nothing
    assert h.stats().deleted == 0
    refresh.release()
    await drained(queues, url, h, deleted=1)
    assert refresh.committed_refs() == {"m:vms:vm-1"}
    assert h.stats().deleted == 1


# -- 3. visibility is renewed while pending ----------------------------------------------------


async def test_visibility_is_renewed_while_the_refresh_takes_longer_than_the_timeout(
    make: Make, queues: Queues
) -> None:
    url, _ = await queues.create("inventory")
    h = await make(url, {"visibility_timeout": 2})
    h.refresh.hold()

    await queues.send(url, cloud_event("vm-1"))

    # three renewals take 2 x 2/3 s each: the refresh is held over twice the timeout
    await wait_for(
        lambda: h.stats().visibility_extensions >= 3, timeout=WAIT, what="three renewals"
    )
    assert await queues.counts(url) == (0, 1)
    assert h.stats().received == 1  # never visible again, never received twice
    assert len(h.refresh.calls) == 1
    h.refresh.release()
    await wait_for(lambda: queues.empty(url), timeout=WAIT, what="the queue to empty")
    assert h.stats().received == 1


# -- 4. SNS -> SQS -----------------------------------------------------------------------------


async def test_sns_envelopes_are_unwrapped(
    make: Make, queues: Queues, aws_client: AwsClients
) -> None:
    url, _ = await queues.create("inventory")
    arn = await queues.attribute(url, "QueueArn")
    async with aws_client("sns") as sns:
        topic = (await sns.create_topic(Name="cloud-events"))["TopicArn"]
        await sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
        await sns.publish(TopicArn=topic, Message=json.dumps(cloud_event("vm-ce")))
        await sns.publish(TopicArn=topic, Message=json.dumps({"vms": ["vm-plain"]}))
    body = (await queues.sqs.receive_message(QueueUrl=url, VisibilityTimeout=0))["Messages"][0]
    assert json.loads(body["Body"])["Type"] == "Notification"  # moto delivers the envelope

    h = await make(url)

    await wait_for(lambda: queues.empty(url), timeout=WAIT, what="the queue to empty")
    assert h.refresh.committed_refs() == {"m:vms:vm-ce", "m:vms:vm-plain"}
    assert sum(h.stats().poisoned.values()) == 0


def test_decoding_bodies() -> None:
    sent = {"SentTimestamp": "1714557600000"}  # 2024-05-01T10:00:00Z
    plain = {"MessageId": "m-1", "Body": '{"vms": ["vm-1"]}', "Attributes": sent}
    event, when = decode_message(plain, queue_name="q")
    assert (event.mode, event.id, event.source, event.data) == (
        EventMode.PLAIN,
        "m-1",
        "sqs:q",
        {"vms": ["vm-1"]},
    )
    assert when == 1714557600.0

    eventbridge = {"detail-type": "EC2 Instance State-change Notification", "detail": {}}
    eventbridge["time"] = "2024-05-01T10:00:05Z"
    envelope = {"Type": "Notification", "Message": json.dumps(eventbridge)}
    message = {"MessageId": "m-2", "Body": json.dumps(envelope), "Attributes": sent}
    event, when = decode_message(message, queue_name="q")
    assert event.data == eventbridge
    assert when == 1714557605.0

    structured = {"MessageId": "m-3", "Body": json.dumps(cloud_event("vm-1"))}
    event, when = decode_message(structured, queue_name="q")
    assert (event.mode, event.id, when) == (EventMode.STRUCTURED, "evt-vm-vm-1", 1714557600.0)

    for body in ("not json", json.dumps({"Type": "Notification", "Message": "nope"}), ""):
        with pytest.raises(DecodeError):
            decode_message({"MessageId": "m-4", "Body": body}, queue_name="q")


# -- 5. poison messages ------------------------------------------------------------------------


async def test_poison_goes_to_the_dead_letter_queue_and_good_messages_around_it_are_processed(
    make: Make, queues: Queues
) -> None:
    url, dlq = await queues.create("inventory", max_receive_count=2)
    unmappable = cloud_event("vm-x") | {"type": "com.other.thing"}
    await queues.send(url, cloud_event("vm-1"), "not json", unmappable, cloud_event("vm-2"))
    h = await make(url, {"visibility_timeout": 60})  # poison is released at once, not after 60 s

    async def settled() -> bool:
        return await queues.empty(url) and await queues.counts(dlq) == (2, 0)

    await wait_for(settled, timeout=WAIT, what="the poison in the dead-letter queue")
    assert h.refresh.committed_refs() == {"m:vms:vm-1", "m:vms:vm-2"}
    stats = h.stats()
    assert stats.poisoned == {"undecodable": 2, "unroutable": 0, "mapper_error": 2}
    assert stats.dead_lettered == {"undecodable": 1, "unroutable": 0, "mapper_error": 1}
    assert (stats.submitted, stats.deleted) == (2, 2)
    dead = await queues.sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10)
    assert sorted(m["Body"] for m in dead["Messages"]) == sorted(
        ["not json", json.dumps(unmappable)]
    )
    metrics = Metrics()
    metrics.register_pipeline(
        batcher_stats=dict,
        pending=dict,
        catchers=[CatcherProbe(h.catcher.name, h.catcher.stats, h.catcher.healthy)],
    )
    scraped = generate_latest(metrics.registry).decode()
    assert (
        'refreshd_events_dead_lettered_total{catcher="sqs-test",reason="undecodable"} 1.0'
        in scraped
    )
    assert 'refreshd_events_received_total{catcher="sqs-test"} 6.0' in scraped


async def test_without_a_redrive_policy_start_fails_and_says_what_to_do(
    make: Make, queues: Queues
) -> None:
    url, _ = await queues.create("no-redrive", max_receive_count=None)
    h = await make(url, start=False)

    with pytest.raises(SqsQueueError, match=r"no-redrive has no RedrivePolicy.*delete_poison"):
        await h.catcher.start()
    assert not h.catcher.healthy()


async def test_delete_poison_logs_and_deletes_poison(
    make: Make, queues: Queues, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = await queues.create("no-redrive", max_receive_count=None)
    h = await make(url, {"delete_poison": True})
    caplog.set_level(logging.WARNING, logger="catchers.sqs.receiving")

    await queues.send(url, "{broken json", cloud_event("vm-1"))

    await drained(queues, url, h, deleted=2)
    assert h.refresh.committed_refs() == {"m:vms:vm-1"}
    stats = h.stats()
    assert stats.poisoned["undecodable"] == 1
    assert stats.deleted == 2
    assert "{broken json" in caplog.text
    assert "delete_poison" in caplog.text


# -- 6. backpressure ---------------------------------------------------------------------------


async def test_a_full_batcher_stops_the_receives_and_nothing_is_lost(
    make: Make, queues: Queues
) -> None:
    url, _ = await queues.create("inventory", max_receive_count=2)
    vms = [f"vm-{i:02}" for i in range(15)]
    await queues.send(url, *(cloud_event(vm) for vm in vms))
    h = await make(
        url,
        settings=BatchingSettings(debounce=0.0, max_pending_targets=1),
        start=False,
    )
    h.refresh.hold()
    h.batcher.submit([Target.of("m", "vms", "busy-1")], Ack(received_at=0.0))
    await wait_for(lambda: h.refresh.calls, timeout=WAIT, what="the first refresh")
    h.batcher.submit([Target.of("m", "vms", "busy-2")], Ack(received_at=0.0))  # full now
    await h.catcher.start()

    await wait_for(lambda: h.stats().paused, timeout=WAIT, what="the receive loop to pause")
    assert h.stats().received == 0  # no receive while the batcher is full
    assert await queues.counts(url) == (15, 0)

    # with room for one target at a time, a receive of 10 is handed on one by one:
    # the others are held (renewed), not given back to the queue
    h.refresh.release()
    await drained(queues, url, h, deleted=15)
    assert h.refresh.committed_refs() == {f"m:vms:{vm}" for vm in [*vms, "busy-1", "busy-2"]}
    stats = h.stats()
    assert (stats.received, stats.submitted, stats.deleted) == (15, 15, 15)
    assert stats.backpressure_pauses >= 2
    assert sum(stats.poisoned.values()) == 0


# -- 7. close while pending: at-least-once -----------------------------------------------------


async def test_close_leaves_pending_messages_to_the_next_catcher(
    make: Make, queues: Queues
) -> None:
    url, _ = await queues.create("inventory")
    first = await make(url)
    first.refresh.hold()
    await queues.send(url, cloud_event("vm-1"))
    await wait_for(lambda: first.refresh.calls, timeout=WAIT, what="the first refresh")

    await first.catcher.stop()
    assert first.catcher.healthy()
    await first.catcher.close()

    assert await queues.counts(url) == (1, 0)  # not deleted, visible again
    first.refresh.release()  # committing after close deletes nothing
    await wait_for(lambda: first.refresh.committed, timeout=WAIT, what="the late commit")
    assert first.stats().deleted == 0
    assert await queues.counts(url) == (1, 0)

    second = await make(url)
    await drained(queues, url, second, deleted=1)
    assert second.refresh.committed_refs() == {"m:vms:vm-1"}
    assert second.stats().deleted == 1


async def test_stop_takes_no_more_messages_in(make: Make, queues: Queues) -> None:
    url, _ = await queues.create("inventory")
    h = await make(url)
    await h.catcher.stop()

    await queues.send(url, cloud_event("vm-1"))

    # the long poll cut short by stop() may still take it server-side: then it is
    # visible again after the visibility timeout, never handed on
    await wait_for(
        lambda: _equals(queues.counts(url), (1, 0)), timeout=WAIT, what="the message visible"
    )
    assert h.stats().received == 0
    assert h.refresh.calls == []
    assert h.catcher.healthy()


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


# -- 8. a queue that is not there, bad options -------------------------------------------------


async def test_a_nonexistent_queue_fails_start_with_a_clear_error(
    make: Make, queues: Queues
) -> None:
    url = f"{queues.moto.endpoint_url}/{queues.moto.account}/missing"
    h = await make(url, start=False)

    with pytest.raises(SqsQueueError, match=r"queue .*/missing does not exist"):
        await h.catcher.start()
    assert not h.catcher.healthy()


async def test_a_queue_deleted_while_running_makes_the_catcher_unhealthy(
    make: Make, queues: Queues
) -> None:
    url, _ = await queues.create("inventory")
    h = await make(url)
    assert h.catcher.healthy()

    await queues.sqs.delete_queue(QueueUrl=url)

    await wait_for(lambda: not h.catcher.healthy(), timeout=WAIT, what="unhealthy")


def _context() -> CatcherContext:
    return CatcherContext(
        sink=Batcher(GatedRefresh()),
        managers={"m": ManagerEndpoint("m", "mixed", mixed_mapper)},
        clock=lambda: 0.0,
    )


URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/inventory"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"manager": "m"}, "queue_url"),
        ({"manager": "m", "queue_url": "inventory"}, "not an SQS queue URL"),
        ({"manager": "m", "queue_url": URL, "colour": "red"}, "colour"),
        ({"manager": "m", "queue_url": URL, "aws_secret_access_key": "x"}, "aws_secret"),
        ({"manager": "m", "queue_url": URL, "wait_time": 30}, "wait_time"),
        ({"manager": "m", "queue_url": URL, "wait_time": "1500ms"}, "wait_time"),
        ({"manager": "m", "queue_url": URL, "max_messages": 11}, "max_messages"),
        ({"manager": "m", "queue_url": URL, "visibility_timeout": 1}, "visibility_timeout"),
        ({"manager": "m", "queue_url": URL, "concurrency": 0}, "concurrency"),
        ({"queue_url": URL}, "give exactly one of manager"),
        ({"manager": "nope", "queue_url": URL}, "unknown manager 'nope'"),
    ],
)
def test_bad_options_raise_value_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create(options, _context())


def test_options_and_the_entry_point() -> None:
    assert load_catcher("sqs") is create
    catcher = create(
        {"managers": {URL: "m"}, "queue_url": URL, "visibility_timeout": "2m"}, _context()
    )
    assert catcher.name == "sqs"
    assert not catcher.healthy()  # not started
    stats = catcher.stats()
    for key in ("received", "decoded", "submitted", "skipped", "deleted", "in_flight"):
        assert getattr(stats, key) == 0
    assert stats.poisoned == {"undecodable": 0, "unroutable": 0, "mapper_error": 0}
