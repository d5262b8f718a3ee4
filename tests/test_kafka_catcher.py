"""The Kafka catcher against a real broker (Tansu): targets, offsets, dead letters,
backpressure and rebalances.

The sink is a stand-in for the batcher: it records what was submitted and
resolves an event's Ack only when the test says its refresh committed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from catchers.cloudevents import CloudEvent
from catchers.intake import EventRejection
from catchers.kafka.catcher import KafkaCatcher, create
from catchers.kafka.records import map_record
from catchers.kafka.settings import KafkaSettings
from catchers.routing import DeadLetterReason
from daemon.model.acks import Ack, QueueFullError
from daemon.model.catcher import CatcherContext, ManagerEndpoint
from daemon.model.provider import EventMapper
from daemon.model.targets import Target

kafka = pytest.mark.kafka

FAST: dict[str, Any] = {
    "rebalance_timeout": 1.0,
    "session_timeout": 2.0,
    "heartbeat_interval": 0.5,
    "commit_interval": 0.2,
    "commit_timeout": 0.5,
    "drain_timeout": 0.3,
    "poll_timeout": 0.1,
}


# -- the batcher stand-in --------------------------------------------------------


@dataclass
class Submission:
    targets: list[Target]
    ack: Ack

    @property
    def event_ids(self) -> list[str | None]:
        return [t.event_id for t in self.targets]


class FakeSink:
    """A TargetSink with a capacity in open (unacknowledged) events."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self.submissions: list[Submission] = []
        self.refused = 0
        self._room = asyncio.Event()
        self._room.set()

    def submit(self, targets: Sequence[Target], ack: Ack) -> None:
        if not self.has_room():
            self.refused += 1
            raise QueueFullError("full")
        ack.expect(len(targets))
        self.submissions.append(Submission(list(targets), ack))
        ack.resolve_if_empty()
        self._update()

    def submit_many(self, events: Sequence[tuple[Sequence[Target], Ack]]) -> int:
        for taken, (targets, ack) in enumerate(events):
            try:
                self.submit(targets, ack)
            except QueueFullError:
                return taken
        return len(events)

    def has_room(self) -> bool:
        return self.open() < self.capacity

    async def wait_for_room(self) -> None:
        while not self.has_room():
            self._room.clear()
            await self._room.wait()

    def open(self) -> int:
        return sum(1 for s in self.submissions if not s.ack.done)

    def set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self._update()

    def commit(self, *event_ids: str) -> None:
        """The refresh of these events committed: resolve their Acks."""
        wanted = set(event_ids)
        found = set()
        for submission in self.submissions:
            if set(submission.event_ids) & wanted and not submission.ack.done:
                found |= set(submission.event_ids)
                for _ in submission.targets:
                    submission.ack.target_committed()
        assert wanted <= found, f"not submitted (or already committed): {wanted - found}"
        self._update()

    def commit_all(self) -> None:
        self.commit(*{i for s in self.submissions if not s.ack.done for i in s.event_ids if i})

    def ids(self) -> list[str]:
        return [i for s in self.submissions for i in s.event_ids if i is not None]

    def _update(self) -> None:
        if self.has_room():
            self._room.set()


# -- routing and mapping used by the tests ----------------------------------------


def vm_mapper(manager: str, event: dict[str, Any]) -> list[Target]:
    data = event["data"]
    if data.get("explode"):
        raise RuntimeError("boom")
    return [Target.of(manager, "vms", vm, event_id=event["id"]) for vm in data["vms"]]


def route(topic: str, event: CloudEvent) -> tuple[str, EventMapper] | None:
    if event.type == "unknown.type":
        return None
    return ("m1", vm_mapper)


# -- helpers --------------------------------------------------------------------


def settings(bootstrap: str, topic: str, group: str, **overrides: Any) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=(bootstrap,),
        topics=(topic,),
        group_id=group,
        name="test-catcher",
        **(FAST | overrides),
    )


def catcher_for(config: KafkaSettings, sink: FakeSink) -> KafkaCatcher:
    return KafkaCatcher(
        config,
        sink=sink,
        route=route,
        feeds=lambda topic: ("m1",),
        clock=asyncio.get_running_loop().time,
    )


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 15.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert loop.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


Record = tuple[bytes | None, list[tuple[str, bytes]], int]
"""value, headers, partition"""


def plain(vm: str, partition: int = 0, **data: Any) -> Record:
    return (json.dumps({"vms": [vm], **data}).encode(), [], partition)


async def produce(bootstrap: str, topic: str, records: Sequence[Record], key: bytes = b"k") -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value, headers, partition in records:
            await producer.send_and_wait(
                topic, value, key=key, headers=headers, partition=partition
            )
    finally:
        await producer.stop()


async def committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> dict[int, Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


async def read_all(bootstrap: str, topic: str, count: int) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        records: list[Any] = []

        async def fetch() -> bool:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
            return len(records) >= count

        await wait_until(fetch, f"{count} records in {topic}")
        return records
    finally:
        await consumer.stop()


def ids(topic: str, partition: int, offsets: Sequence[int]) -> list[str]:
    return [f"{topic}/{partition}/{o}" for o in offsets]


# -- tests ------------------------------------------------------------------------


@kafka
async def test_every_mode_becomes_targets(
    kafka_bootstrap: str, kafka_topic_factory: Any, kafka_group_id: str
) -> None:
    topic = await kafka_topic_factory()
    ce = {"specversion": "1.0", "source": "/awesome", "type": "vm.changed"}
    structured = {**ce, "id": "s-1", "time": "2024-05-01T10:20:30Z", "data": {"vms": ["vm-s"]}}
    batch = [
        {**ce, "id": "b-1", "data": {"vms": ["vm-b1"]}},
        {**ce, "id": "b-2", "data": {"vms": ["vm-b2"]}},
    ]
    binary_headers = [(f"ce_{k}", v.encode()) for k, v in ce.items()] + [
        ("ce_id", b"bin-1"),
        ("content-type", b"application/json"),
    ]
    await produce(
        kafka_bootstrap,
        topic,
        [
            (
                json.dumps(structured).encode(),
                [("content-type", b"application/cloudevents+json")],
                0,
            ),
            (b'{"vms": ["vm-bin"]}', binary_headers, 0),
            (b'{"vms": ["vm-plain"]}', [], 0),
            (
                json.dumps(batch).encode(),
                [("content-type", b"application/cloudevents-batch+json")],
                0,
            ),
        ],
    )
    sink = FakeSink()
    async with catcher_for(settings(kafka_bootstrap, topic, kafka_group_id), sink) as catcher:
        await wait_until(lambda: len(sink.submissions) == 4, "4 submissions")
        assert [[str(t) for t in s.targets] for s in sink.submissions] == [
            ["m1:vms:vm-s"],
            ["m1:vms:vm-bin"],
            ["m1:vms:vm-plain"],
            ["m1:vms:vm-b1", "m1:vms:vm-b2"],
        ]
        assert sink.ids() == ["s-1", "bin-1", f"{topic}/0/2", "b-1", "b-2"]
        assert sink.submissions[0].ack.event_time == 1714558830.0
        assert sink.submissions[2].ack.event_time is None
        assert catcher.healthy()
        sink.commit_all()
        await wait_until(
            lambda: catcher.stats().committed == {f"{topic}/0": 4}, "offset 4 committed"
        )
        stats = catcher.stats()
        assert (stats.received, stats.decoded, stats.acknowledged) == (4, 4, 4)
        assert await catcher.lag() == {TopicPartition(topic, 0): 0}
    assert await committed(kafka_bootstrap, kafka_group_id, topic) == {0: 4}


@kafka
async def test_commits_stop_at_the_first_unacked_and_a_restart_resumes_there(
    kafka_bootstrap: str, kafka_topic_factory: Any, kafka_group_id: str
) -> None:
    topic = await kafka_topic_factory()
    await produce(kafka_bootstrap, topic, [plain(f"vm-{i}") for i in range(6)])
    config = settings(kafka_bootstrap, topic, kafka_group_id)

    sink = FakeSink()
    catcher = catcher_for(config, sink)
    await catcher.start()
    try:
        await wait_until(lambda: len(sink.submissions) == 6, "6 submissions")
        sink.commit(*ids(topic, 0, [3, 1, 4]))
        await wait_until(lambda: catcher.counters.acknowledged == 3, "3 acks")
        sink.commit(*ids(topic, 0, [0]))
        await wait_until(
            lambda: catcher.stats().committed == {f"{topic}/0": 2}, "offset 2 committed"
        )
        assert catcher.in_flight() == 2
    finally:
        await catcher.stop()
        await catcher.close()  # 2 and 5 are still unacknowledged
    assert await committed(kafka_bootstrap, kafka_group_id, topic) == {0: 2}

    # A new process of the same group reads again from 2: the unacked 2 and 5
    # (and 3 and 4, acknowledged after the gap: re-delivery is harmless).
    sink2 = FakeSink()
    async with catcher_for(config, sink2) as catcher2:
        await wait_until(lambda: len(sink2.submissions) == 4, "re-delivery from offset 2")
        assert sink2.ids() == ids(topic, 0, [2, 3, 4, 5])
        sink2.commit(*ids(topic, 0, [5, 4, 3]))
        await wait_until(lambda: catcher2.counters.acknowledged == 3, "3 acks")
        assert catcher2.stats().committed == {}  # 2 holds the position back
        sink2.commit(*ids(topic, 0, [2]))
        await wait_until(
            lambda: catcher2.stats().committed == {f"{topic}/0": 6}, "offset 6 committed"
        )

    sink3 = FakeSink()
    async with catcher_for(config, sink3):
        await produce(kafka_bootstrap, topic, [plain("vm-new")])
        await wait_until(lambda: len(sink3.submissions) == 1, "only the new record")
        assert sink3.ids() == ids(topic, 0, [6])


@kafka
async def test_bad_records_go_to_the_dead_letter_topic(
    kafka_bootstrap: str, kafka_topic_factory: Any, kafka_group_id: str
) -> None:
    topic = await kafka_topic_factory()
    dlq = await kafka_topic_factory(name=f"{topic}.dlq")
    unknown = {"specversion": "1.0", "id": "u-1", "source": "/x", "type": "unknown.type"}
    await produce(
        kafka_bootstrap,
        topic,
        [
            (b"{garbage", [("origin", b"test"), ("refreshd-error", b"stale")], 0),
            (json.dumps(unknown).encode(), [], 0),
            plain("vm-x", explode=True),
            plain("vm-ok"),
        ],
    )
    sink = FakeSink()
    async with catcher_for(settings(kafka_bootstrap, topic, kafka_group_id), sink) as catcher:
        await wait_until(lambda: len(sink.submissions) == 1, "the good record")
        assert sink.ids() == ids(topic, 0, [3])
        await wait_until(
            lambda: sum(catcher.counters.dead_lettered.values()) == 3, "3 dead letters"
        )
        assert catcher.counters.dead_lettered == {
            DeadLetterReason.UNDECODABLE: 1,
            DeadLetterReason.UNROUTABLE: 1,
            DeadLetterReason.MAPPER_ERROR: 1,
        }
        # Dead letters count as acknowledged: the position waits only for offset 3.
        await wait_until(
            lambda: catcher.stats().committed == {f"{topic}/0": 3}, "offset 3 committed"
        )
        sink.commit_all()
        await wait_until(
            lambda: catcher.stats().committed == {f"{topic}/0": 4}, "offset 4 committed"
        )

    letters = await read_all(kafka_bootstrap, dlq, 3)
    by_offset = {int(dict(r.headers)["refreshd-source-offset"]): r for r in letters}
    assert sorted(by_offset) == [0, 1, 2]
    garbage = by_offset[0]
    headers = dict(garbage.headers)
    assert garbage.key == b"k" and garbage.value == b"{garbage"
    assert headers["origin"] == b"test"
    assert headers["refreshd-error"].startswith(b"invalid JSON: ")
    assert headers["refreshd-reason"] == b"undecodable"
    assert headers["refreshd-source-topic"] == topic.encode()
    assert headers["refreshd-source-partition"] == b"0"
    assert headers["refreshd-catcher"] == b"test-catcher"
    assert [k for k, _ in garbage.headers].count("refreshd-error") == 1
    assert dict(by_offset[1].headers)["refreshd-error"].startswith(b"no manager for event 'u-1'")
    assert dict(by_offset[2].headers)["refreshd-error"] == (
        b"mapper of manager 'm1' raised RuntimeError: boom"
    )


@kafka
async def test_backpressure_pauses_without_leaving_the_group(
    kafka_bootstrap: str, kafka_topic_factory: Any, kafka_group_id: str
) -> None:
    topic = await kafka_topic_factory()
    tp = TopicPartition(topic, 0)
    await produce(kafka_bootstrap, topic, [plain(f"vm-{i}") for i in range(3)])
    config = settings(kafka_bootstrap, topic, kafka_group_id, max_poll_interval=3.0)
    sink = FakeSink(capacity=1)  # takes record 0, refuses record 1 (QueueFull)
    loop = asyncio.get_running_loop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        async with catcher_for(config, sink) as catcher:
            await wait_until(lambda: sink.refused >= 1 and catcher.counters.paused, "a pause")
            paused_at = loop.time()
            # Real broker time: stay paused longer than max_poll_interval (3 s).
            await wait_until(lambda: loop.time() - paused_at > 4.0, "4 s of pause", timeout=6)
            assert sink.ids() == ids(topic, 0, [0])
            assert catcher.assignment() == {tp}
            assert await catcher.lag() == {tp: 2}  # sought back to record 1
            [group] = (await admin.describe_consumer_groups([kafka_group_id]))[0].groups
            assert (group[2], len(group[5])) == ("Stable", 1)  # state, members

            sink.set_capacity(100)
            await wait_until(lambda: len(sink.submissions) == 3, "records 1 and 2 after room")
            assert sink.ids() == ids(topic, 0, [0, 1, 2])  # nothing skipped, nothing twice
            assert not catcher.counters.paused
            sink.commit_all()
            await wait_until(
                lambda: catcher.stats().committed == {f"{topic}/0": 3}, "offset 3 committed"
            )
            assert catcher.counters.commit_errors == 0
            assert catcher.counters.backpressure_pauses >= 1
    finally:
        await admin.close()


@kafka
async def test_a_rebalance_commits_acked_offsets_on_revoke(
    kafka_bootstrap: str, kafka_topic_factory: Any, kafka_group_id: str
) -> None:
    topic = await kafka_topic_factory(partitions=4)
    await produce(
        kafka_bootstrap, topic, [plain(f"vm-{p}-{i}", p) for p in range(4) for i in range(2)]
    )
    # A commits only on revoke (its periodic commit is far away).
    slow = {"rebalance_timeout": 3.0, "commit_timeout": 1.0}
    config_a = settings(kafka_bootstrap, topic, kafka_group_id, commit_interval=60.0, **slow)
    config_b = settings(kafka_bootstrap, topic, kafka_group_id, **slow)
    sink_a, sink_b = FakeSink(), FakeSink()
    async with catcher_for(config_a, sink_a) as a:
        await wait_until(lambda: len(sink_a.submissions) == 8, "8 submissions to A")
        acked = [
            *ids(topic, 0, [0, 1]),
            *ids(topic, 1, [0, 1]),
            *ids(topic, 2, [0]),
            *ids(topic, 3, [0]),
        ]
        sink_a.commit(*acked)
        assert await committed(kafka_bootstrap, kafka_group_id, topic, 4) == dict.fromkeys(range(4))

        async with catcher_for(config_b, sink_b) as b:
            await wait_until(
                lambda: len(a.assignment()) == 2 and len(b.assignment()) == 2, "2 + 2 partitions"
            )
            assert a.assignment() | b.assignment() == {TopicPartition(topic, p) for p in range(4)}
            assert await committed(kafka_bootstrap, kafka_group_id, topic, 4) == {
                0: 2,
                1: 2,
                2: 1,
                3: 1,
            }
            # Only the unacknowledged records are delivered again, to whoever owns them now.
            redelivered = {*ids(topic, 2, [1]), *ids(topic, 3, [1])}
            await wait_until(
                lambda: redelivered <= set(sink_a.ids()[8:] + sink_b.ids()), "re-delivery"
            )
            again = sink_a.ids()[8:] + sink_b.ids()
            assert sorted(again) == sorted(redelivered)


@kafka
async def test_a_bad_record_behind_a_refused_one_is_dead_lettered_once_when_read_again(
    kafka_bootstrap: str, kafka_topic_factory: Any, kafka_group_id: str
) -> None:
    topic = await kafka_topic_factory()
    dlq = await kafka_topic_factory(name=f"{topic}.dlq")
    await produce(kafka_bootstrap, topic, [plain("vm-0"), plain("vm-1"), (b"{bad", [], 0)])
    sink = FakeSink(capacity=1)  # takes record 0, refuses record 1: record 2 waits behind it
    async with catcher_for(settings(kafka_bootstrap, topic, kafka_group_id), sink) as catcher:
        await wait_until(lambda: sink.refused >= 1 and catcher.counters.paused, "a pause")
        assert sum(catcher.counters.dead_lettered.values()) == 0
        assert catcher.in_flight() == 1  # record 1 was given back, record 2 never handed on

        sink.set_capacity(100)
        await wait_until(
            lambda: catcher.counters.dead_lettered[DeadLetterReason.UNDECODABLE] == 1,
            "the dead letter",
        )
        sink.commit_all()
        await wait_until(
            lambda: catcher.stats().committed == {f"{topic}/0": 3}, "offset 3 committed"
        )
        assert sink.ids() == ids(topic, 0, [0, 1])
        assert catcher.stats().received == 3
    [letter] = await read_all(kafka_bootstrap, dlq, 1)
    assert dict(letter.headers)["refreshd-source-offset"] == b"2"


def record(value: bytes | None, headers: Sequence[tuple[str, bytes]] = (), offset: int = 7) -> Any:
    return SimpleNamespace(value=value, headers=tuple(headers), offset=offset, key=b"k")


TP = TopicPartition("t", 3)
CE = [("ce_specversion", b"1.0"), ("ce_source", b"/awesome"), ("ce_type", b"vm.changed")]


def test_map_record_gives_targets_and_the_earliest_event_time() -> None:
    binary = [*CE, ("ce_id", b"b-1"), ("ce_time", b"2024-05-01T10:20:30Z")]
    assert map_record(route, TP, record(b'{"vms": ["vm-1", "vm-2"]}', binary)) == (
        [Target.of("m1", "vms", "vm-1"), Target.of("m1", "vms", "vm-2")],
        1714558830.0,
    )
    targets, when = map_record(route, TP, record(b'{"vms": ["vm-3"]}'))
    assert [t.event_id for t in targets] == ["t/3/7"] and when is None  # plain: no time
    ce = {"specversion": "1.0", "source": "/awesome", "type": "vm.changed"}
    batch = [
        {**ce, "id": "x", "time": "2024-05-01T10:20:31Z", "data": {"vms": ["a"]}},
        {**ce, "id": "y", "data": {"vms": ["b"]}},
        {**ce, "id": "z", "time": "2024-05-01T10:20:30Z", "data": {"vms": []}},
    ]
    batch_ct = [("content-type", b"application/cloudevents-batch+json")]
    targets, when = map_record(route, TP, record(json.dumps(batch).encode(), batch_ct))
    assert [t.event_id for t in targets] == ["x", "y"] and when == 1714558830.0


def test_map_record_says_why_a_record_is_rejected() -> None:
    def mapper_returning(value: Any) -> Any:
        return lambda topic, event: ("m1", lambda manager, event: [value])

    def broken_route(topic: str, event: CloudEvent) -> tuple[str, EventMapper] | None:
        raise KeyError("nope")

    unknown = [*CE[:2], ("ce_type", b"unknown.type"), ("ce_id", b"u-1")]
    cases: list[tuple[Any, Any, EventRejection]] = [
        (route, record(b"{bad"), EventRejection(DeadLetterReason.UNDECODABLE, "", decoded=False)),
        (
            route,
            record(b"{}", unknown),
            EventRejection(
                DeadLetterReason.UNROUTABLE,
                "no manager for event 'u-1' (type 'unknown.type', source '/awesome', topic 't')",
                decoded=True,
            ),
        ),
        (
            broken_route,
            record(b"{}"),
            EventRejection(
                DeadLetterReason.UNROUTABLE, "route raised KeyError: 'nope'", decoded=True
            ),
        ),
        (
            route,
            record(b'{"explode": true}'),
            EventRejection(
                DeadLetterReason.MAPPER_ERROR,
                "mapper of manager 'm1' raised RuntimeError: boom",
                decoded=True,
            ),
        ),
        (
            mapper_returning("vm-1"),
            record(b"{}"),
            EventRejection(
                DeadLetterReason.MAPPER_ERROR,
                "mapper of manager 'm1' raised TypeError: returned a str, not a Target",
                decoded=True,
            ),
        ),
    ]
    for routing, rec, expected in cases:
        rejection = map_record(routing, TP, rec)
        assert isinstance(rejection, EventRejection)
        assert (rejection.reason, rejection.decoded) == (expected.reason, expected.decoded)
        assert rejection.message.startswith(expected.message)


async def test_factory_builds_a_catcher_from_options() -> None:
    sink = FakeSink()
    endpoint = ManagerEndpoint("m1", "awesome_cloud", vm_mapper)
    context = CatcherContext(sink=sink, managers={"m1": endpoint}, clock=lambda: 0.0)
    catcher = create(
        {"bootstrap_servers": "a:9092,b:9092", "topics": ["t"], "group_id": "g", "manager": "m1"},
        context,
    )
    assert catcher.name == "kafka" and not catcher.healthy()
    with pytest.raises(ValueError, match="unknown manager 'nope'"):
        create({"topics": "t", "group_id": "g", "manager": "nope"}, context)
    with pytest.raises(ValueError, match="give exactly one of"):
        create({"bootstrap_servers": "a", "topics": "t", "group_id": "g"}, context)
    with pytest.raises(ValueError, match="commit_timeout"):
        KafkaSettings(
            bootstrap_servers=("a",),
            topics=("t",),
            group_id="g",
            commit_timeout=5,
            rebalance_timeout=5,
        )


def test_durations_accept_units() -> None:
    s = KafkaSettings.model_validate(
        {
            "bootstrap_servers": "a:9092",
            "topics": "t",
            "group_id": "g",
            "poll_timeout": "100ms",
            "commit_interval": "1s",
            "session_timeout": "6s",
            "heartbeat_interval": 2,
            "max_poll_interval": "5m",
            "rebalance_timeout": "1m",
            "fetch_backoff": ["500ms", 2],
        }
    )
    assert (s.poll_timeout, s.commit_interval, s.session_timeout) == (0.1, 1.0, 6.0)
    assert (s.max_poll_interval, s.rebalance_timeout, s.fetch_backoff) == (300.0, 60.0, (0.5, 2.0))
    for bad in ({"commit_interval": "soon"}, {"poll_timeout": "0s"}, {"drain_timeout": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KafkaSettings.model_validate(
                {"bootstrap_servers": "a", "topics": "t", "group_id": "g", **bad}
            )


@kafka
async def test_stop_while_paused_returns_and_close_commits(
    kafka_bootstrap: str, kafka_topic_factory: Any, kafka_group_id: str
) -> None:
    topic = await kafka_topic_factory()
    await produce(kafka_bootstrap, topic, [plain(f"vm-{i}") for i in range(2)])
    sink = FakeSink(capacity=1)
    catcher = catcher_for(settings(kafka_bootstrap, topic, kafka_group_id, drain_timeout=5.0), sink)
    await catcher.start()
    try:
        await wait_until(lambda: sink.refused >= 1 and catcher.counters.paused, "a pause")
        await asyncio.wait_for(catcher.stop(), timeout=2.0)
        assert catcher.healthy()
        sink.set_capacity(100)  # room again, but intake is stopped: nothing more comes in
        closing = asyncio.create_task(catcher.close())
        sink.commit_all()  # the refresh of record 0 commits while close() waits for it
        await asyncio.wait_for(closing, timeout=5.0)
    finally:
        await catcher.close()
    assert sink.ids() == ids(topic, 0, [0])
    assert await committed(kafka_bootstrap, kafka_group_id, topic) == {0: 1}
