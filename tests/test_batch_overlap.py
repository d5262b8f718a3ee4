"""Overlap: a manager's next batch collects while the previous one persists (issue 13).

The batcher is given a collect function (collect -> persist) besides the refresh
function (used for full refreshes).  The fake cloud+database records when each
refresh collected and committed; the tests check what a user relies on: commits
follow collects in order, a target is acknowledged only after a refresh that
collected after it arrived committed, full refreshes never overlap anything,
and overlap really happens (the throughput it is for).  Time is a FakeClock.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.model.acks import Ack
from daemon.model.targets import Target, TargetCollection
from daemon.pipeline.batcher import Batcher, BatchingSettings
from tests.fake_clock import FakeClock


@dataclass
class Run:
    full: bool
    refs: set[str]
    collect_started: float
    collect_ended: float | None = None
    persist_started: float | None = None
    committed: float | None = None
    failed: bool = False


@dataclass
class Cloud:
    """Collect and persist with chosen durations; records every run."""

    clock: FakeClock
    collect_s: float = 0.1
    persist_s: float = 0.3
    full_s: float = 1.0
    fail_next_persist: int = 0
    runs: list[Run] = field(default_factory=list)
    commits: list[Run] = field(default_factory=list)
    active: int = 0
    max_active: int = 0

    def _enter(self) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)

    async def collect(self, collection: TargetCollection) -> Callable[[], Awaitable[object]] | None:
        if any(t.manager_ref["ems_ref"].startswith("disk") for t in collection):
            return None  # resolved from the database: not collected ahead
        run = Run(False, {t.manager_ref["ems_ref"] for t in collection}, self.clock.now())
        self.runs.append(run)
        self._enter()
        try:
            await self.clock.sleep_until(run.collect_started + self.collect_s)
        except BaseException:
            self.active -= 1
            raise
        run.collect_ended = self.clock.now()

        async def persist() -> object:
            try:
                run.persist_started = self.clock.now()
                await self.clock.sleep_until(run.persist_started + self.persist_s)
                if self.fail_next_persist:
                    self.fail_next_persist -= 1
                    run.failed = True
                    raise RuntimeError("database refused the transaction")
                run.committed = self.clock.now()
                self.commits.append(run)
                return None
            finally:
                self.active -= 1

        return persist

    async def refresh(self, collection: TargetCollection) -> object:
        refs = {t.manager_ref["ems_ref"] for t in collection if not t.is_full}
        run = Run(collection.is_full, refs, self.clock.now())
        self.runs.append(run)
        self._enter()
        try:
            await self.clock.sleep_until(run.collect_started + self.full_s)
            run.collect_ended = run.persist_started = run.committed = self.clock.now()
            self.commits.append(run)
        finally:
            self.active -= 1
        return None


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cloud(clock: FakeClock) -> Cloud:
    return Cloud(clock)


def make(cloud: Cloud, clock: FakeClock, **fields: float) -> Batcher:
    return Batcher(
        cloud.refresh,
        collect=cloud.collect,
        settings=BatchingSettings(
            **{"debounce": 0.01, "max_delay": 0.05, "retry_initial": 0.2, "retry_jitter": 0.0}
            | fields
        ),
        clock=clock,
        rng=random.Random(0),
    )


@pytest.fixture
async def batcher(cloud: Cloud, clock: FakeClock) -> AsyncIterator[Batcher]:
    async with make(cloud, clock) as b:
        yield b


class Tracker:
    """Submits one target per event and records when each was submitted and acknowledged."""

    def __init__(self, batcher: Batcher, clock: FakeClock) -> None:
        self.batcher, self.clock = batcher, clock
        self.sent: dict[int, tuple[str, float]] = {}
        """event number -> (ref, time sent)"""
        self.acked: dict[int, float] = {}

    def send(self, ref: str) -> Ack:
        event = len(self.sent)
        ack = Ack(received_at=self.clock.now())
        self.sent[event] = (ref, self.clock.now())
        ack.add_done_callback(lambda a: self.acked.setdefault(event, self.clock.now()))
        self.batcher.submit([Target.of("m1", "vms", ref)], ack)
        return ack

    def refs_acked(self) -> set[str]:
        return {self.sent[event][0] for event in self.acked}

    def all_acked(self) -> bool:
        return set(self.acked) == set(self.sent)


def check_order(cloud: Cloud) -> None:
    """Commits follow collects; a persist starts only after the previous run ended."""
    started = [r for r in cloud.runs if r.persist_started is not None or r.full]
    assert [r.collect_started for r in cloud.commits] == sorted(
        r.collect_started for r in cloud.commits
    )
    for earlier, later in zip(cloud.runs, cloud.runs[1:], strict=False):
        if later.persist_started is None:
            continue
        end = earlier.committed if earlier.committed is not None else later.persist_started
        assert later.persist_started >= end
        assert later.collect_started >= (earlier.collect_ended or 0.0)
    assert cloud.max_active <= 2
    assert started


def check_acks(cloud: Cloud, tracker: Tracker) -> None:
    """Each target was acknowledged after a refresh that collected it after it arrived."""
    for event, acked in tracker.acked.items():
        ref, sent = tracker.sent[event]
        assert any(
            r.committed is not None
            and r.committed <= acked
            and r.collect_started >= sent
            and (r.full or ref in r.refs)
            for r in cloud.runs
        ), f"{ref} acknowledged without a refresh that collected it after it arrived"


async def test_next_batch_collects_while_the_previous_persists(batcher, clock, cloud):
    tracker = Tracker(batcher, clock)
    for i in range(200):  # 100 events/s for 2 s
        tracker.send(f"v{i}")
        await clock.advance(0.01)
    await clock.advance(3.0)

    assert tracker.all_acked()
    overlapped = [
        (a, b)
        for a, b in zip(cloud.runs, cloud.runs[1:], strict=False)
        if a.committed is not None and b.collect_started < a.committed
    ]
    assert overlapped, "no batch collected while the previous one persisted"
    assert cloud.max_active == 2
    check_order(cloud)
    check_acks(cloud, tracker)


async def test_a_target_arriving_during_a_persist_is_collected_after_it(batcher, clock, cloud):
    tracker = Tracker(batcher, clock)
    tracker.send("a")
    await clock.advance(0.05)  # dispatched at 0.01; collected at 0.11; persists to 0.41
    await clock.advance(0.1)
    tracker.send("b")  # the next batch: collects now, while "a" persists
    await clock.advance(0.05)
    tracker.send("a")  # "a" again, mid-persist: must be collected again, later
    await clock.advance(2.0)

    assert [sorted(r.refs) for r in cloud.runs] == [["a"], ["b"], ["a"]]
    assert cloud.runs[1].collect_started < cloud.runs[0].committed
    assert cloud.runs[2].collect_started >= tracker.sent[2][1]
    check_order(cloud)
    check_acks(cloud, tracker)


async def test_a_full_refresh_never_overlaps_a_targeted_one(batcher, clock, cloud):
    tracker = Tracker(batcher, clock)
    tracker.send("a")
    await clock.advance(0.15)  # "a" persisting
    full = batcher.request_full("m1")
    await clock.advance(0.02)
    tracker.send("b")  # before the full refresh starts: it covers "b"
    await clock.advance(0.4)
    tracker.send("c")  # during the full refresh: the next, targeted batch
    await clock.advance(3.0)

    assert full.done and tracker.all_acked()
    runs = cloud.runs
    assert [(r.full, sorted(r.refs)) for r in runs] == [(False, ["a"]), (True, []), (False, ["c"])]
    assert runs[1].collect_started >= runs[0].committed
    assert runs[2].collect_started >= runs[1].committed
    check_order(cloud)


async def test_a_failed_persist_is_retried_after_the_later_batch_commits(batcher, clock, cloud):
    tracker = Tracker(batcher, clock)
    cloud.fail_next_persist = 1
    tracker.send("a")
    await clock.advance(0.15)
    tracker.send("b")
    await clock.advance(3.0)

    assert tracker.all_acked()
    assert [(sorted(r.refs), r.failed) for r in cloud.runs] == [
        (["a"], True),
        (["b"], False),
        (["a"], False),
    ]
    check_acks(cloud, tracker)


async def test_a_batch_that_cannot_be_collected_ahead_runs_alone_in_its_turn(batcher, clock, cloud):
    tracker = Tracker(batcher, clock)
    tracker.send("a")
    await clock.advance(0.15)  # "a" persisting
    tracker.send("disk-1")
    await clock.advance(0.2)
    tracker.send("b")
    await clock.advance(3.0)

    assert tracker.all_acked()
    a, disk, b = cloud.runs
    assert disk.refs == {"disk-1"} and disk.collect_started >= a.committed
    assert b.collect_started >= disk.committed
    check_acks(cloud, tracker)


@settings(max_examples=40, deadline=None)
@given(
    gaps=st.lists(st.sampled_from([0.0, 0.005, 0.03, 0.2]), min_size=1, max_size=80),
    refs=st.lists(st.sampled_from([*"abcdefg", "disk-1"]), min_size=80, max_size=80),
    collect_s=st.sampled_from([0.01, 0.1]),
    persist_s=st.sampled_from([0.02, 0.3]),
    fails=st.integers(0, 3),
    fulls=st.sets(st.integers(0, 79), max_size=3),
)
def test_commits_follow_collects_and_every_ack_follows_a_later_collect(
    gaps, refs, collect_s, persist_s, fails, fulls
):
    async def play() -> None:
        clock = FakeClock(settle_rounds=10)
        cloud = Cloud(clock, collect_s=collect_s, persist_s=persist_s, fail_next_persist=fails)
        async with make(cloud, clock, full_refresh_threshold=5) as b:
            tracker = Tracker(b, clock)
            for i, gap in enumerate(gaps):
                if i in fulls:
                    b.request_full("m1")
                tracker.send(refs[i])
                await clock.advance(gap)
            await clock.advance(30.0)
            assert tracker.all_acked()
        check_order(cloud)
        full_spans = [(r.collect_started, r.committed) for r in cloud.runs if r.full]
        for r in cloud.runs:
            if r.full:
                continue
            for start, end in full_spans:
                assert end is not None
                assert not (start < r.collect_started < end), "collected during a full refresh"

    asyncio.run(play())
