"""The batcher's coalescing, timing, retry and shutdown rules (DESIGN.md 6-9).

Time is a FakeClock: tests move it with ``await clock.advance(s)`` and never
wait on real time.  The refresh is a fake that records each batch it
receives (manager, targets, start time) and can hold, fail or take time.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as Counter_

from daemon.model.acks import Ack, QueueFullError
from daemon.model.targets import Target, TargetCollection
from daemon.pipeline.backoff import Backoff
from daemon.pipeline.batcher import (
    NO_HOOKS,
    Batcher,
    BatcherStoppedError,
    BatchingSettings,
    RefreshHooks,
    RefreshKind,
)
from daemon.pipeline.clock import LOOP_CLOCK
from daemon.service.metrics import LATENCY_BUCKETS, EventLatencies, MeteredSink, Metrics
from tests.fake_clock import FakeClock


def vm(ref: str, manager: str = "m1") -> Target:
    return Target.of(manager, "vms", ref)


@dataclass
class Call:
    manager: str
    targets: set[str]
    full: bool
    started_at: float
    gate: asyncio.Future[None] | None


class FakeRefresh:
    """Records batches; can hold each call on a gate, take time, or fail on demand."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[Call] = []
        self.hold = False
        self.duration = 0.0
        self.failures: dict[str, deque[Exception]] = defaultdict(deque)
        self.active: Counter[str] = Counter()
        self.max_active_per_manager = 0
        self.max_active = 0

    def fail(self, manager: str, *errors: Exception) -> None:
        self.failures[manager].extend(errors)

    def of(self, manager: str) -> list[Call]:
        return [c for c in self.calls if c.manager == manager]

    async def __call__(self, collection: TargetCollection) -> int:
        manager = collection.manager
        gate = asyncio.get_running_loop().create_future() if self.hold else None
        call = Call(
            manager, {str(t) for t in collection}, collection.is_full, self.clock.now(), gate
        )
        self.calls.append(call)
        self.active[manager] += 1
        self.max_active_per_manager = max(self.max_active_per_manager, self.active[manager])
        self.max_active = max(self.max_active, sum(self.active.values()))
        try:
            if self.duration:
                await self.clock.sleep_until(call.started_at + self.duration)
            if gate is not None:
                await gate
            if self.failures[manager]:
                raise self.failures[manager].popleft()
            return len(collection)
        finally:
            self.active[manager] -= 1


class Boom(Exception):
    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__("boom")
        if retry_after is not None:
            self.retry_after = retry_after


MakeBatcher = Callable[..., Batcher]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def refresh(clock: FakeClock) -> FakeRefresh:
    return FakeRefresh(clock)


@pytest.fixture
async def make_batcher(clock: FakeClock, refresh: FakeRefresh) -> AsyncIterator[MakeBatcher]:
    started: list[Batcher] = []

    def make(
        *,
        overrides: dict[str, BatchingSettings] | None = None,
        hooks: RefreshHooks = NO_HOOKS,
        **fields: Any,
    ) -> Batcher:
        batcher = Batcher(
            refresh,
            # the timings below were written for debounce 0.5 s and max_delay 5 s
            settings=BatchingSettings(
                **{"retry_jitter": 0.0, "debounce": 0.5, "max_delay": 5.0, **fields}
            ),
            overrides=overrides or {},
            clock=clock,
            rng=random.Random(0),
            hooks=hooks,
        )
        batcher.start()
        started.append(batcher)
        return batcher

    yield make
    for batcher in started:
        await batcher.close(cancel=True)


def submit(batcher: Batcher, clock: FakeClock, *targets: Target) -> Ack:
    ack = Ack(received_at=clock.now())
    batcher.submit(list(targets), ack)
    return ack


# -- coalescing and timing ---------------------------------------------------


async def test_batch_is_dispatched_after_debounce_of_quiet(make_batcher, clock, refresh):
    batcher = make_batcher()
    acks = [submit(batcher, clock, vm(ref)) for ref in ("a", "b", "c")]

    await clock.advance(0.4)
    assert refresh.calls == []

    await clock.advance(0.2)
    assert [(c.targets, c.full, c.started_at) for c in refresh.calls] == [
        ({"m1:vms:a", "m1:vms:b", "m1:vms:c"}, False, 0.5)
    ]
    assert all(ack.done for ack in acks)
    assert batcher.stats.batches_dispatched[RefreshKind.TARGETED] == 1


async def test_a_steady_stream_does_not_hold_a_batch_back(make_batcher, clock, refresh):
    # debounce counts from the oldest target, quiet or not (issue 13: a batch goes when
    # it is worth going, not only after debounce of quiet)
    batcher = make_batcher()
    submit(batcher, clock, vm("a"))
    await clock.advance(0.4)
    submit(batcher, clock, vm("b"))
    await clock.advance(0.05)
    assert refresh.calls == []

    await clock.advance(0.05)
    submit(batcher, clock, vm("c"))
    await clock.advance(0.6)
    assert [(c.targets, c.started_at) for c in refresh.calls] == [
        ({"m1:vms:a", "m1:vms:b"}, 0.5),
        ({"m1:vms:c"}, 1.0),
    ]


async def test_pending_target_is_not_added_twice_and_every_ack_waits_on_it(
    make_batcher, clock, refresh
):
    batcher = make_batcher()
    first = submit(batcher, clock, vm("a"))
    second = submit(batcher, clock, vm("a"), vm("b"))
    assert batcher.pending_count("m1") == 2

    await clock.advance(0.5)
    assert [c.targets for c in refresh.calls] == [{"m1:vms:a", "m1:vms:b"}]
    assert first.done and second.done
    assert batcher.stats.targets_enqueued == 3
    assert batcher.stats.targets_coalesced == 1


async def test_max_delay_caps_the_wait(make_batcher, clock, refresh):
    batcher = make_batcher(debounce=2.0, max_delay=1.0)
    for i in itertools.count():
        if clock.now() >= 1.0 - 1e-9:
            break
        submit(batcher, clock, vm(f"v{i}"))
        await clock.advance(0.3)

    assert len(refresh.calls) == 1
    assert refresh.calls[0].started_at == pytest.approx(1.0)
    assert len(refresh.calls[0].targets) == 4  # t = 0, 0.3, 0.6, 0.9


async def test_batch_reaching_max_targets_is_dispatched_at_once(make_batcher, clock, refresh):
    batcher = make_batcher(max_targets=3)
    submit(batcher, clock, vm("a"), vm("b"))
    await clock.advance(0.1)
    assert refresh.calls == []

    submit(batcher, clock, vm("c"))
    await clock.settle()
    assert [(len(c.targets), c.started_at) for c in refresh.calls] == [(3, 0.1)]


async def test_distinct_targets_at_threshold_make_a_full_refresh(make_batcher, clock, refresh):
    batcher = make_batcher(full_refresh_threshold=3)
    submit(batcher, clock, vm("a"), vm("a"), vm("b"))  # duplicates do not count
    await clock.advance(0.5)
    submit(batcher, clock, vm("a"), vm("b"))
    late = submit(batcher, clock, vm("c"))
    await clock.advance(0.5)

    assert [(c.targets, c.full) for c in refresh.calls] == [
        ({"m1:vms:a", "m1:vms:b"}, False),
        ({"m1:full"}, True),
    ]
    assert late.done
    assert batcher.stats.batches_dispatched == {RefreshKind.TARGETED: 1, RefreshKind.FULL: 1}


async def test_target_arriving_mid_refresh_waits_for_the_next_batch(make_batcher, clock, refresh):
    refresh.hold = True
    batcher = make_batcher()
    early = submit(batcher, clock, vm("a"))
    await clock.advance(0.5)
    assert len(refresh.calls) == 1

    again = submit(batcher, clock, vm("a"))  # already in flight: must be refreshed again
    other = submit(batcher, clock, vm("b"))
    refresh.calls[0].gate.set_result(None)
    await clock.settle()
    assert early.done
    assert not again.done and not other.done

    await clock.advance(0.5)
    assert [c.targets for c in refresh.calls] == [{"m1:vms:a"}, {"m1:vms:a", "m1:vms:b"}]
    refresh.calls[1].gate.set_result(None)
    await clock.settle()
    assert again.done and other.done


async def test_per_manager_overrides(make_batcher, clock, refresh):
    batcher = make_batcher(overrides={"slow": BatchingSettings(debounce=2.0, max_delay=5.0)})
    submit(batcher, clock, vm("a"), vm("b", manager="slow"))
    await clock.advance(3)
    assert [(c.manager, c.started_at) for c in refresh.calls] == [("m1", 0.5), ("slow", 2.0)]


async def test_one_ack_for_targets_of_two_managers(make_batcher, clock, refresh):
    batcher = make_batcher(overrides={"m2": BatchingSettings(debounce=1.0)})
    ack = submit(batcher, clock, vm("a"), vm("b", manager="m2"))
    await clock.advance(0.5)
    assert not ack.done
    await clock.advance(0.5)
    assert ack.done


async def test_empty_submit_resolves_the_ack_at_once(make_batcher, clock, refresh):
    batcher = make_batcher()
    assert submit(batcher, clock).done
    assert batcher.pending_count() == 0


# -- concurrency -------------------------------------------------------------


async def test_never_two_refreshes_of_one_manager_at_once(make_batcher, clock, refresh):
    refresh.duration = 2.0
    batcher = make_batcher(max_delay=1.0)
    for i in range(20):
        submit(batcher, clock, vm(f"v{i}"))
        await clock.advance(0.25)
    await clock.advance(10)

    assert refresh.max_active_per_manager == 1
    starts = [c.started_at for c in refresh.calls]
    assert all(later - earlier >= 2.0 for earlier, later in itertools.pairwise(starts))
    assert set().union(*(c.targets for c in refresh.calls)) == {f"m1:vms:v{i}" for i in range(20)}


async def test_worker_limit_across_managers_oldest_due_first(make_batcher, clock, refresh):
    refresh.hold = True
    batcher = make_batcher(workers=1)
    submit(batcher, clock, vm("a", manager="m2"))  # due 0.5
    await clock.advance(0.1)
    submit(batcher, clock, vm("a", manager="m3"))  # due 0.6
    await clock.advance(0.1)
    submit(batcher, clock, vm("a", manager="m1"))  # due 0.7
    await clock.advance(1)
    assert [c.manager for c in refresh.calls] == ["m2"]
    assert batcher.in_flight_managers() == {"m2"}

    for expected in (["m2", "m3"], ["m2", "m3", "m1"]):
        refresh.calls[-1].gate.set_result(None)
        await clock.settle()
        assert [c.manager for c in refresh.calls] == expected
    assert refresh.max_active == 1


async def test_managers_refresh_in_parallel_up_to_workers(make_batcher, clock, refresh):
    refresh.hold = True
    batcher = make_batcher(workers=2)
    for manager in ("m1", "m2", "m3"):
        submit(batcher, clock, vm("a", manager=manager))
    await clock.advance(0.5)
    assert [c.manager for c in refresh.calls] == ["m1", "m2"]

    refresh.calls[1].gate.set_result(None)
    await clock.settle()
    assert [c.manager for c in refresh.calls] == ["m1", "m2", "m3"]
    assert refresh.max_active == 2


# -- failures and retries ----------------------------------------------------


async def test_retry_backoff_then_escalation_to_full(make_batcher, clock, refresh):
    failures: list[tuple[str, bool, str, int, float | None]] = []

    def on_failure(manager: str, collection: TargetCollection, exc: Exception) -> None:
        status = batcher.manager_status(manager)
        failures.append(
            (
                manager,
                collection.is_full,
                str(exc),
                status.consecutive_failures,
                status.next_retry_at,
            )
        )

    batcher = make_batcher(escalate_after=3, hooks=RefreshHooks(on_failure=on_failure))
    refresh.fail("m1", Boom(), Boom(), Boom())
    ack = submit(batcher, clock, vm("a"))

    await clock.advance(20)
    assert [(c.started_at, c.full) for c in refresh.calls] == [
        (0.5, False),
        (1.5, False),
        (3.5, False),
        (7.5, True),
    ]
    assert failures == [
        ("m1", False, "boom", 1, 1.5),
        ("m1", False, "boom", 2, 3.5),
        ("m1", False, "boom", 3, 7.5),
    ]
    assert ack.done
    assert batcher.stats.refresh_failures[RefreshKind.TARGETED] == 3
    assert batcher.stats.refresh_successes[RefreshKind.FULL] == 1
    assert batcher.stats.escalations == 1


async def test_retry_delay_is_capped(make_batcher, clock, refresh):
    batcher = make_batcher(retry_max=3.0, escalate_after=10)
    refresh.fail("m1", *(Boom() for _ in range(4)))
    submit(batcher, clock, vm("a"))
    await clock.advance(20)
    assert [c.started_at for c in refresh.calls] == [0.5, 1.5, 3.5, 6.5, 9.5]


async def test_ack_waits_through_failures(make_batcher, clock, refresh):
    batcher = make_batcher()
    refresh.fail("m1", Boom())
    ack = submit(batcher, clock, vm("a"))
    await clock.advance(1.0)
    assert len(refresh.calls) == 1
    assert not ack.done
    status = batcher.manager_status("m1")
    assert (status.pending, status.consecutive_failures, status.next_retry_at) == (1, 1, 1.5)
    assert status.last_error == "Boom: boom"

    await clock.advance(0.5)
    assert ack.done
    assert batcher.manager_status("m1").consecutive_failures == 0
    assert batcher.manager_status("m1").last_success_at == 1.5


async def test_failed_targets_merge_with_newer_ones(make_batcher, clock, refresh):
    refresh.hold = True
    batcher = make_batcher()
    first = submit(batcher, clock, vm("a"))
    await clock.advance(0.5)
    second = submit(batcher, clock, vm("b"))
    refresh.calls[0].gate.set_exception(Boom())
    await clock.advance(1.0)

    assert [(c.targets, c.started_at) for c in refresh.calls] == [
        ({"m1:vms:a"}, 0.5),
        ({"m1:vms:a", "m1:vms:b"}, 1.5),
    ]
    assert not first.done and not second.done
    refresh.calls[1].gate.set_result(None)
    await clock.settle()
    assert first.done and second.done


@pytest.mark.parametrize(("retry_after", "retry_at"), [(10.0, 10.5), (0.2, 1.5)])
async def test_retry_after_is_the_minimum_delay(
    make_batcher, clock, refresh, retry_after, retry_at
):
    batcher = make_batcher()
    refresh.fail("m1", Boom(retry_after=retry_after))
    submit(batcher, clock, vm("a"))
    await clock.advance(20)
    assert [c.started_at for c in refresh.calls] == [0.5, retry_at]


def test_backoff_jitter_comes_from_the_given_random():
    backoff = Backoff(initial=1.0, maximum=300.0, multiplier=2.0, jitter=0.1)
    delays = [backoff.delay(n, rng=random.Random(7)) for n in (1, 2, 3, 100)]
    assert delays == [backoff.delay(n, rng=random.Random(7)) for n in (1, 2, 3, 100)]
    for delay, base in zip(delays, (1.0, 2.0, 4.0, 300.0), strict=True):
        assert base * 0.9 <= delay <= base * 1.1


async def test_hooks_see_each_refresh_start_and_its_result(make_batcher, clock, refresh):
    refresh.duration = 2.0
    seen: list[tuple[float, str, str, set[str], object]] = []
    hooks = RefreshHooks(
        on_start=lambda m, c: seen.append((clock.now(), "start", m, {str(t) for t in c}, None)),
        on_success=lambda m, c, r: seen.append((clock.now(), "ok", m, {str(t) for t in c}, r)),
    )
    batcher = make_batcher(hooks=hooks)
    submit(batcher, clock, vm("a"), vm("b"))
    await clock.advance(3)
    both = {"m1:vms:a", "m1:vms:b"}
    assert seen == [(0.5, "start", "m1", both, None), (2.5, "ok", "m1", both, 2)]


async def test_failing_hook_does_not_stop_the_batcher(make_batcher, clock, refresh):
    def broken(manager: str, collection: TargetCollection, result: object) -> None:
        raise RuntimeError("hook bug")

    batcher = make_batcher(hooks=RefreshHooks(on_success=broken))
    first = submit(batcher, clock, vm("a"))
    await clock.advance(1)
    second = submit(batcher, clock, vm("b"))
    await clock.advance(1)
    assert first.done and second.done


# -- full refreshes ----------------------------------------------------------


async def test_pending_full_refresh_absorbs_earlier_targets(make_batcher, clock, refresh):
    batcher = make_batcher()
    acks = [submit(batcher, clock, vm("a")), submit(batcher, clock, vm("b"))]
    acks.append(batcher.request_full("m1"))
    await clock.advance(0.5)

    assert [(c.targets, c.full) for c in refresh.calls] == [({"m1:full"}, True)]
    assert all(ack.done for ack in acks)


async def test_request_full_returns_an_ack_of_the_full_refresh(make_batcher, clock, refresh):
    refresh.hold = True
    batcher = make_batcher()
    ack = batcher.request_full("m1")
    await clock.advance(0.5)
    assert [c.full for c in refresh.calls] == [True]
    assert batcher.manager_status("m1").in_flight_kind is RefreshKind.FULL
    assert not ack.done
    refresh.calls[0].gate.set_result(None)
    await clock.settle()
    assert ack.done


# -- backpressure ------------------------------------------------------------


async def test_queue_full_rejects_the_whole_event(make_batcher, clock, refresh):
    batcher = make_batcher(max_pending_targets=3)
    submit(batcher, clock, vm("a"), vm("b"))
    with pytest.raises(QueueFullError):
        submit(batcher, clock, vm("c"), vm("d"))
    assert batcher.pending_count() == 2
    assert batcher.has_room()

    submit(batcher, clock, vm("c"))
    assert not batcher.has_room()
    duplicate = submit(batcher, clock, vm("a"))  # adds nothing: accepted
    room = asyncio.create_task(batcher.wait_for_room())
    await clock.settle()
    assert not room.done()

    await clock.advance(0.5)
    assert room.done()
    assert batcher.has_room()
    assert duplicate.done
    assert batcher.stats.targets_rejected == 2


async def test_submit_many_queues_in_order_up_to_the_first_event_that_does_not_fit(
    make_batcher, clock, refresh
):
    batcher = make_batcher(max_pending_targets=3)
    acks = [Ack(received_at=clock.now()) for _ in range(6)]
    events = [
        ([vm("a")], acks[0]),
        ([vm("a")], acks[1]),  # already pending: adds nothing, waits on the same refresh
        ([], acks[2]),  # no targets: done at once
        ([vm("b"), vm("c", "m2")], acks[3]),  # two managers; fills the queue
        ([vm("d")], acks[4]),  # does not fit
        ([vm("a")], acks[5]),  # would fit, but events are queued in order
    ]
    assert batcher.submit_many(events) == 4
    assert (batcher.pending_count("m1"), batcher.pending_count("m2")) == (2, 1)
    assert [a.done for a in acks] == [False, False, True, False, False, False]
    stats = batcher.stats
    assert (stats.targets_enqueued, stats.targets_coalesced, stats.targets_rejected) == (4, 1, 1)

    await clock.advance(0.5)
    assert [a.done for a in acks] == [True, True, True, True, False, False]
    assert batcher.submit_many(events[4:]) == 2  # the caller hands the rest again
    await clock.advance(0.5)
    assert all(a.done for a in acks)
    assert [c.targets for c in refresh.of("m1")] == [
        {"m1:vms:a", "m1:vms:b"},
        {"m1:vms:a", "m1:vms:d"},
    ]


async def test_submit_many_of_events_without_targets_leaves_the_batcher_idle(
    make_batcher, clock, refresh
):
    batcher = make_batcher()
    ack = Ack(received_at=clock.now())
    assert batcher.submit_many([([], ack)]) == 1
    assert ack.done
    assert await batcher.drain(0)
    batcher.stop()
    refused = Ack(received_at=clock.now())
    assert batcher.submit_many([([vm("a")], refused)]) == 0
    assert not refused.done and batcher.pending_count() == 0


async def test_metered_sink_observes_each_queued_event_once(make_batcher, clock, refresh):
    batcher = make_batcher(max_pending_targets=1)
    metrics = Metrics()
    sink = MeteredSink(batcher, metrics, clock.now)
    acks = [Ack(received_at=clock.now()) for _ in range(3)]
    assert sink.submit_many([([vm("a")], acks[0]), ([vm("a")], acks[1]), ([vm("b")], acks[2])]) == 2
    assert sink.events_submitted == 2
    await clock.advance(0.5)
    assert [a.done for a in acks] == [True, True, False]
    text = generate_latest(metrics.registry).decode()
    assert "refreshd_events_committed_total 2.0" in text
    assert 'refreshd_event_commit_latency_seconds_bucket{le="0.4"} 0.0' in text
    assert 'refreshd_event_commit_latency_seconds_bucket{le="0.5"} 2.0' in text
    assert "refreshd_event_commit_latency_seconds_sum 1.0" in text
    assert metrics.recent_latency() == (0.5, 0.5)


def test_ack_calls_on_done_then_the_added_callbacks_in_order():
    calls: list[str] = []
    ack = Ack(received_at=0.0, on_done=lambda a: calls.append("on_done"))
    for name in ("first", "second", "third"):
        ack.add_done_callback(lambda a, name=name: calls.append(name))
    ack.expect(1)
    ack.target_committed()
    ack.add_done_callback(lambda a: calls.append("late"))  # already done: called at once
    assert calls == ["on_done", "first", "second", "third", "late"]
    ack.target_committed()  # a second resolution calls nothing again
    assert len(calls) == 5


def test_event_latencies_export_what_prometheus_client_would():
    observed = [0.0, 0.01, 0.0101, 0.3, 2.5, 299.0, 300.0, 301.0, 1e-4, *[i / 7 for i in range(50)]]
    own = CollectorRegistry()
    histogram = Histogram(
        "refreshd_event_commit_latency_seconds",
        "From the cloud's event time (or receipt when it has none) to the refresh commit",
        buckets=LATENCY_BUCKETS,
        registry=own,
    )
    counter = Counter_(
        "refreshd_events_committed", "Events whose targets were all committed", registry=own
    )
    ours = CollectorRegistry()
    latencies = EventLatencies(LATENCY_BUCKETS)
    ours.register(latencies)
    for value in observed:
        histogram.observe(value)
        counter.inc()
        latencies.observe(value)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [re.sub(r"(_created) \S+$", r"\1 -", line) for line in text.splitlines()]

    assert lines(ours) == lines(own)


async def test_request_full_is_accepted_when_the_queue_is_full(make_batcher, clock, refresh):
    batcher = make_batcher(max_pending_targets=1)
    submit(batcher, clock, vm("a"))
    ack = batcher.request_full("m2")
    await clock.advance(0.5)
    assert ack.done


# -- shutdown ----------------------------------------------------------------


async def test_flush_ignores_debounce_and_drain_waits_for_in_flight(make_batcher, clock, refresh):
    refresh.duration = 1.0
    batcher = make_batcher()
    ack = submit(batcher, clock, vm("a"))
    await batcher.flush()
    await clock.settle()
    assert [c.started_at for c in refresh.calls] == [0.0]

    drained = asyncio.create_task(batcher.drain(5))
    await clock.advance(0.5)
    assert not drained.done()
    await clock.advance(0.5)
    assert drained.done() and drained.result() is True
    assert ack.done


async def test_drain_times_out_on_a_long_refresh(make_batcher, clock, refresh):
    refresh.duration = 10.0
    batcher = make_batcher()
    ack = submit(batcher, clock, vm("a"))
    await batcher.flush()
    drained = asyncio.create_task(batcher.drain(5))
    await clock.advance(5)
    assert drained.done() and drained.result() is False
    assert not ack.done


async def test_stopped_batcher_refuses_targets_but_finishes_its_work(make_batcher, clock, refresh):
    batcher = make_batcher(max_pending_targets=1)
    ack = submit(batcher, clock, vm("a"))
    batcher.stop()
    with pytest.raises(BatcherStoppedError):
        submit(batcher, clock, vm("b"))
    with pytest.raises(QueueFullError):  # catchers that only know QueueFullError back off too
        batcher.request_full("m1")
    await batcher.wait_for_room()  # returns: the caller will see the stop on submit

    await batcher.flush()
    assert await batcher.drain(1)
    assert ack.done


async def test_close_with_cancel_leaves_acks_unresolved(make_batcher, clock, refresh):
    refresh.hold = True
    batcher = make_batcher()
    ack = submit(batcher, clock, vm("a"))
    await clock.advance(0.5)
    assert batcher.running
    await batcher.close(cancel=True)
    assert not batcher.running
    assert not ack.done
    assert sum(refresh.active.values()) == 0
    assert batcher.pending_count() == 1  # kept, for the status line


async def test_close_without_cancel_waits_for_in_flight(make_batcher, clock, refresh):
    refresh.duration = 1.0
    batcher = make_batcher()
    ack = submit(batcher, clock, vm("a"))
    await clock.advance(0.5)
    closing = asyncio.create_task(batcher.close())
    await clock.advance(0.5)
    assert not closing.done()
    await clock.advance(0.5)
    assert closing.done() and ack.done


async def test_status_reports_pending_and_in_flight(make_batcher, clock, refresh):
    refresh.hold = True
    batcher = make_batcher()
    submit(batcher, clock, vm("a"), vm("b"))
    await clock.advance(0.5)
    submit(batcher, clock, vm("c"))
    status = batcher.manager_status("m1")
    assert (status.pending, status.in_flight, status.in_flight_kind, status.in_flight_targets) == (
        1,
        True,
        RefreshKind.TARGETED,
        2,
    )
    assert status.pending_since == 0.5
    assert batcher.pending_count() == 1
    assert batcher.manager_status("never-seen").pending == 0
    assert [s.manager for s in batcher.statuses()] == ["m1"]


# -- property: at-least-once and per-manager serialization --------------------

MANAGERS = ("m1", "m2", "m3")
REFS = ("a", "b", "c", "d", "e", "full")

steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("submit"),
            st.sampled_from(MANAGERS),
            st.lists(st.sampled_from(REFS), max_size=4),
        ),
        st.tuples(st.just("advance"), st.sampled_from((0.1, 0.3, 0.5, 1.0, 2.5))),
        st.tuples(st.just("finish"), st.sampled_from(MANAGERS), st.booleans()),
    ),
    max_size=40,
)


@dataclass
class Run:
    manager: str
    keys: set[tuple[str, Any]]
    full: bool
    started: int
    gate: asyncio.Future[None]
    succeeded_at: int | None = None


@dataclass
class Model:
    seq: itertools.count[int] = field(default_factory=itertools.count)
    runs: list[Run] = field(default_factory=list)
    running: dict[str, Run] = field(default_factory=dict)
    overlaps: int = 0
    max_running: int = 0
    resolved: dict[int, int] = field(default_factory=dict)

    async def refresh(self, collection: TargetCollection) -> None:
        manager = collection.manager
        if manager in self.running:
            self.overlaps += 1
        gate = asyncio.get_running_loop().create_future()
        run = Run(manager, {t.key for t in collection}, collection.is_full, next(self.seq), gate)
        self.runs.append(run)
        self.running[manager] = run
        self.max_running = max(self.max_running, len(self.running))
        try:
            await gate
        finally:
            del self.running[manager]

    def finish(self, manager: str, ok: bool) -> None:
        run = self.running.get(manager)
        if run is None or run.gate.done():
            return
        if ok:
            run.succeeded_at = next(self.seq)
            run.gate.set_result(None)
        else:
            run.gate.set_exception(Boom())


def make_target(manager: str, ref: str) -> Target:
    return Target.full(manager) if ref == "full" else vm(ref, manager)


async def play(plan: list[tuple[Any, ...]]) -> None:
    clock = FakeClock(settle_rounds=20)
    model = Model()
    batcher = Batcher(
        model.refresh,
        settings=BatchingSettings(
            debounce=0.5,
            max_delay=2.0,
            max_targets=4,
            full_refresh_threshold=6,
            workers=2,
            retry_initial=0.5,
            retry_max=4.0,
            retry_jitter=0.1,
            escalate_after=2,
            max_pending_targets=8,
        ),
        clock=clock,
        rng=random.Random(1),
    )
    accepted: list[tuple[Ack, list[Target], int]] = []
    async with batcher:
        for step in plan:
            if step[0] == "submit":
                targets = [make_target(step[1], ref) for ref in step[2]]
                ack = Ack(received_at=clock.now())
                ack.add_done_callback(lambda a: model.resolved.setdefault(id(a), next(model.seq)))
                try:
                    batcher.submit(targets, ack)
                except QueueFullError:
                    continue
                accepted.append((ack, targets, next(model.seq)))
            elif step[0] == "advance":
                await clock.advance(step[1])
            else:
                model.finish(step[1], step[2])
                await clock.settle()
        for _ in range(30):
            if all(ack.done for ack, _, _ in accepted) and not model.running:
                break
            for manager in list(model.running):
                model.finish(manager, ok=True)
            await clock.advance(5.0)

    assert model.overlaps == 0
    assert model.max_running <= 2
    for ack, targets, submitted in accepted:
        assert ack.done, "every accepted event is eventually acknowledged"
        resolved = model.resolved[id(ack)]
        for target in targets:
            assert any(
                run.manager == target.manager
                and run.started > submitted
                and run.succeeded_at is not None
                and run.succeeded_at < resolved
                and (run.full or target.key in run.keys)
                for run in model.runs
            ), f"{target} acknowledged without a later successful refresh"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_acks_follow_a_later_successful_refresh_and_managers_never_overlap(plan):
    asyncio.run(play(plan))


# -- the production clock ----------------------------------------------------


async def test_loop_clock_drives_a_batcher_without_delays():
    refresh_calls: list[TargetCollection] = []

    async def record(collection: TargetCollection) -> None:
        refresh_calls.append(collection)

    async with Batcher(record, settings=BatchingSettings(debounce=0, max_delay=0)) as batcher:
        ack = Ack(received_at=0.0)
        batcher.submit([vm("a")], ack)
        async with asyncio.timeout(5):
            await ack.wait()
            assert await batcher.drain(0)
    assert [c.manager for c in refresh_calls] == ["m1"]


async def test_loop_clock_wait_event():
    clock = LOOP_CLOCK
    event = asyncio.Event()
    assert await clock.wait_event(event, clock.now()) is False
    event.set()
    assert await clock.wait_event(event, clock.now()) is True


async def test_drain_does_not_wait_for_a_retry_due_after_its_deadline(make_batcher, clock, refresh):
    refresh.fail("m1", Boom(retry_after=300))  # a manager whose credentials are refused
    batcher = make_batcher(retry_initial=1, retry_max=600)
    ack = submit(batcher, clock, vm("a"))
    await clock.advance(0.5)
    assert len(refresh.calls) == 1
    assert batcher.waiting_to_retry() == {"m1": 1}
    batcher.stop()
    await batcher.flush()

    drained = asyncio.create_task(batcher.drain(30))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert drained.done() and drained.result() is False  # at once: no clock time passed
    assert clock.now() == 0.5
    assert len(refresh.calls) == 1 and not ack.done


async def test_drain_waits_for_a_retry_due_before_its_deadline(make_batcher, clock, refresh):
    refresh.fail("m1", Boom(retry_after=10))
    batcher = make_batcher(retry_initial=1, retry_max=600)
    ack = submit(batcher, clock, vm("a"))
    await clock.advance(0.5)
    batcher.stop()
    await batcher.flush()

    drained = asyncio.create_task(batcher.drain(30))
    await clock.advance(5)
    assert not drained.done()
    await clock.advance(6)
    assert drained.done() and drained.result() is True
    assert len(refresh.calls) == 2 and ack.done


async def test_close_with_cancel_is_bounded_when_a_refresh_ignores_its_cancellation(clock, caplog):
    cancelled, release = asyncio.Event(), asyncio.Event()

    async def stubborn(collection: TargetCollection) -> int:
        # a cancellation lost on the way (asyncio.wait_for on Python 3.11 can do that)
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.set()
        return len(collection)

    batcher = Batcher(stubborn, settings=BatchingSettings(debounce=0.5, max_delay=5.0), clock=clock)
    batcher.start()
    ack = submit(batcher, clock, vm("a"))
    await clock.advance(0.5)
    assert batcher.running
    closing = asyncio.create_task(batcher.close(cancel=True, grace=5.0))
    await clock.advance(4.0)
    assert cancelled.is_set() and not closing.done()  # cancelled, and waited for
    await clock.advance(1.5)
    await asyncio.wait_for(closing, 5)  # real time: a bound on the test, not a measurement
    assert not ack.done
    assert "manager(s) m1 did not end within 5s of being cancelled" in caplog.text
    release.set()  # the refresh left behind ends with the test
