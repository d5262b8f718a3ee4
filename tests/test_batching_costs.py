"""Batching under a steady stream and cost-based escalation (DESIGN.md 8-9, issue 13).

Time is a FakeClock: tests move it with ``await clock.advance(s)``.  The refresh
is a fake cloud+database whose duration follows a cost model the test chooses
(fixed + per target for targeted refreshes, a constant for full ones), and which
can refuse full refreshes (the mass-deletion guard).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select

from daemon.model.acks import Ack
from daemon.model.targets import Target, TargetCollection
from daemon.persistence import schema
from daemon.pipeline.batcher import Batcher, BatchingSettings
from daemon.pipeline.refresh_costs import ManagerCosts
from daemon.service.run_history import seed_costs
from tests.fake_clock import FakeClock


@dataclass
class Run:
    full: bool
    targets: int
    started: float
    ended: float | None = None


class CostlyRefresh:
    """A refresh that takes ``fixed + per_target * n`` (targeted) or ``full`` seconds."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.fixed = 0.01
        self.per_target = 0.001
        self.full = 1.0
        self.refuse_full = False
        self.runs: list[Run] = []

    async def __call__(self, collection: TargetCollection) -> None:
        run = Run(collection.is_full, len(collection), self.clock.now())
        self.runs.append(run)
        took = self.full if run.full else self.fixed + self.per_target * run.targets
        await self.clock.sleep_until(run.started + took)
        if run.full and self.refuse_full:
            raise RuntimeError("mass-deletion guard: full refresh refused")
        run.ended = self.clock.now()

    def kinds(self) -> list[str]:
        return ["full" if r.full else "targeted" for r in self.runs]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def refresh(clock: FakeClock) -> CostlyRefresh:
    return CostlyRefresh(clock)


@pytest.fixture
async def batcher(clock: FakeClock, refresh: CostlyRefresh) -> AsyncIterator[Batcher]:
    b = Batcher(
        refresh,
        settings=BatchingSettings(
            debounce=0.05,
            max_delay=2.0,
            max_targets=10_000,
            full_refresh_threshold=50,
            retry_initial=0.5,
            retry_jitter=0.0,
        ),
        clock=clock,
        rng=random.Random(0),
    )
    async with b:
        yield b


def submit(batcher: Batcher, clock: FakeClock, ref: str, done: dict[str, float]) -> Ack:
    ack = Ack(received_at=clock.now())
    sent = clock.now()
    ack.add_done_callback(lambda a: done.setdefault(ref, clock.now() - sent))
    batcher.submit([Target.of("m1", "vms", ref)], ack)
    return ack


async def stream(
    batcher: Batcher, clock: FakeClock, *, every: float, count: int, prefix: str = "v"
) -> dict[str, float]:
    """Submit ``count`` distinct targets ``every`` seconds apart; returns ref -> latency."""
    done: dict[str, float] = {}
    for i in range(count):
        submit(batcher, clock, f"{prefix}{i}", done)
        await clock.advance(every)
    return done


async def measure_full(batcher: Batcher, clock: FakeClock) -> None:
    ack = batcher.request_full("m1")
    await clock.advance(10.0)
    assert ack.done


# -- a batch goes when it is worth going --------------------------------------


async def test_a_steady_stream_goes_in_back_to_back_batches_not_at_max_delay(
    batcher, clock, refresh
):
    refresh.fixed, refresh.per_target = 0.1, 0.0
    done = await stream(batcher, clock, every=0.01, count=600)  # never 50 ms of quiet
    await clock.advance(3.0)

    assert len(done) == 600
    later = sorted(latency for ref, latency in done.items() if int(ref[1:]) >= 450)
    # the first batch, past the threshold with nothing measured, is a full refresh (1 s);
    # after it a batch goes as soon as the previous refresh ended (it is older than
    # debounce by then): a target waits at most ~2 refreshes (0.1 s each), not max_delay
    assert later[-1] <= 0.25
    assert refresh.kinds()[1:] == ["targeted"] * (len(refresh.runs) - 1)


async def test_a_burst_is_still_coalesced_by_debounce(batcher, clock, refresh):
    refresh.fixed, refresh.per_target = 0.001, 0.0
    await stream(batcher, clock, every=0.1, count=3, prefix="warm")  # cost now measured
    runs_before = len(refresh.runs)
    done: dict[str, float] = {}
    for i in range(5):
        submit(batcher, clock, f"b{i}", done)
        await clock.advance(0.005)
    await clock.advance(1.0)

    assert len(done) == 5
    assert [r.targets for r in refresh.runs[runs_before:]] == [5]


# -- escalation follows cost --------------------------------------------------


async def teach_targeted_costs(batcher: Batcher, clock: FakeClock) -> None:
    """Targeted refreshes of 1..8 targets, so the cost line is known."""
    for size in range(1, 9):
        done: dict[str, float] = {}
        for i in range(size):
            submit(batcher, clock, f"t{size}-{i}", done)
        await clock.advance(1.0)
        assert len(done) == size


async def test_past_the_threshold_a_batch_stays_targeted_when_that_is_cheaper(
    batcher, clock, refresh
):
    refresh.full = 5.0  # a full refresh costs 5 s; 200 targets cost 0.01 + 0.2 s
    await measure_full(batcher, clock)
    await teach_targeted_costs(batcher, clock)
    done: dict[str, float] = {}
    for i in range(200):
        submit(batcher, clock, f"x{i}", done)
    await clock.advance(3.0)

    assert len(done) == 200
    assert refresh.runs[-1].targets == 200 and not refresh.runs[-1].full
    assert refresh.kinds().count("full") == 1


async def test_past_the_threshold_a_batch_goes_full_when_the_full_refresh_is_cheaper(
    batcher, clock, refresh
):
    refresh.full = 0.05  # cheaper than 200 targets (0.21 s)
    await measure_full(batcher, clock)
    await teach_targeted_costs(batcher, clock)
    done: dict[str, float] = {}
    for i in range(200):
        submit(batcher, clock, f"x{i}", done)
    await clock.advance(3.0)

    assert len(done) == 200
    assert refresh.kinds()[-1] == "full"


async def test_with_only_the_full_refresh_measured_a_targeted_chunk_measures_first(
    batcher, clock, refresh
):
    refresh.full = 5.0
    await measure_full(batcher, clock)  # e.g. seeded from refresh_runs after a restart
    done: dict[str, float] = {}
    for i in range(200):  # past the threshold; the targeted cost is not known yet
        submit(batcher, clock, f"x{i}", done)
    await clock.advance(3.0)

    assert len(done) == 200
    assert refresh.kinds() == ["full", "targeted"]


async def test_a_backlog_does_not_turn_into_a_loop_of_full_refreshes(batcher, clock, refresh):
    refresh.full = 0.5
    refresh.per_target = 0.01  # 100 targets: 1 s targeted, dearer than a full refresh
    await measure_full(batcher, clock)
    await teach_targeted_costs(batcher, clock)
    before = len(refresh.runs)
    # 1,000 ev/s for 4 s: every batch is past the threshold and costs more than a full one
    done = await stream(batcher, clock, every=0.001, count=4000)
    await clock.advance(60.0)

    assert len(done) == 4000
    kinds = refresh.kinds()[before:]
    # one full refresh covers what was pending; what arrived since stays targeted until
    # the manager caught up, however far behind it is
    assert kinds.count("full") == 1 and kinds[0] == "full", kinds


async def test_targets_pending_before_a_full_refresh_are_covered_by_it(batcher, clock, refresh):
    refresh.full = 1.0
    before: dict[str, float] = {}
    for i in range(60):  # past the threshold, nothing measured: a full refresh
        submit(batcher, clock, f"a{i}", before)
    await clock.advance(0.06)
    assert refresh.kinds() == ["full"]
    after: dict[str, float] = {}
    for i in range(60):  # arrive during the full refresh: the next batch, targeted
        submit(batcher, clock, f"b{i}", after)
    await clock.advance(0.5)
    assert before == {} and after == {}

    await clock.advance(2.0)
    assert len(before) == 60 and len(after) == 60
    assert refresh.kinds() == ["full", "targeted"]
    assert refresh.runs[1].started >= refresh.runs[0].ended


async def test_a_refused_escalation_is_retried_targeted_and_not_tried_again_until_a_full_succeeds(
    batcher, clock, refresh
):
    refresh.refuse_full = True  # the mass-deletion guard refuses every full refresh
    done: dict[str, float] = {}
    for i in range(60):
        submit(batcher, clock, f"a{i}", done)
    await clock.advance(5.0)
    assert len(done) == 60
    assert refresh.kinds() == ["full", "targeted"]
    assert batcher.manager_status("m1").consecutive_failures == 0

    for i in range(60):  # past the threshold again: stays targeted
        submit(batcher, clock, f"b{i}", done)
    await clock.advance(5.0)
    assert len(done) == 120
    assert refresh.kinds() == ["full", "targeted", "targeted"]

    refresh.refuse_full, refresh.full = False, 0.01  # full refreshes now cheap and allowed
    full = batcher.request_full("m1")  # the scheduled full refresh succeeds
    await clock.advance(5.0)
    assert full.done
    for i in range(60):  # right after it: targeted, until caught up
        submit(batcher, clock, f"c{i}", done)
    await clock.advance(5.0)
    submit(batcher, clock, "e", done)  # a batch below the threshold: caught up
    await clock.advance(5.0)
    for i in range(60):  # size may escalate again
        submit(batcher, clock, f"d{i}", done)
    await clock.advance(5.0)
    assert len(done) == 241
    assert refresh.kinds()[3:] == ["full", "targeted", "targeted", "full"]


# -- the cost model -------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    fixed=st.floats(0.0005, 0.5),
    per_target=st.floats(0.0, 0.01),
    sizes=st.lists(st.integers(1, 500), min_size=2, max_size=40),
)
def test_the_cost_line_recovers_fixed_and_per_target_costs(fixed, per_target, sizes):
    costs = ManagerCosts()
    for n in sizes:
        costs.observe_targeted(n, fixed + per_target * n)
    line = costs.line()
    if line is None:  # sizes too alike: the estimate is an upper bound at the mean size
        estimate = costs.targeted_upper(sizes[-1])
        assert estimate is not None
        assert estimate >= (fixed + per_target * sizes[-1]) * 0.5
        return
    for n in (1, 100, 10_000):
        truth = fixed + per_target * n
        assert line.of(n) == pytest.approx(truth, rel=1e-6, abs=1e-9)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    gaps=st.lists(st.sampled_from([0.0005, 0.002, 0.01, 0.05, 0.3]), min_size=20, max_size=300),
    per_target=st.sampled_from([0.0, 0.001, 0.02]),
    full=st.sampled_from([0.05, 0.5, 3.0]),
)
def test_every_target_is_refreshed_after_it_arrived_and_fulls_never_repeat_on_their_own(
    gaps, per_target, full
):
    async def play() -> None:
        clock = FakeClock(settle_rounds=10)
        refresh = CostlyRefresh(clock)
        refresh.per_target, refresh.full = per_target, full
        b = Batcher(
            refresh,
            settings=BatchingSettings(
                debounce=0.05, max_delay=1.0, full_refresh_threshold=10, retry_jitter=0.0
            ),
            clock=clock,
            rng=random.Random(0),
        )
        arrived: dict[str, float] = {}
        async with b:
            done: dict[str, float] = {}
            for i, gap in enumerate(gaps):
                arrived[f"v{i}"] = clock.now()
                submit(b, clock, f"v{i}", done)
                await clock.advance(gap)
            await clock.advance(60.0)
        assert len(done) == len(gaps)
        kinds = refresh.kinds()
        assert all(not (x == y == "full") for x, y in itertools.pairwise(kinds))
        # one refresh at a time, in order
        for a, c in zip(refresh.runs, refresh.runs[1:], strict=False):
            assert a.ended is not None and c.started >= a.ended
        # each target was acknowledged after a refresh that started after it arrived
        for ref, latency in done.items():
            resolved = arrived[ref] + latency
            assert any(
                r.started >= arrived[ref] and r.ended is not None and r.ended <= resolved + 1e-9
                for r in refresh.runs
            )

    asyncio.run(play())


async def test_a_backlog_is_refreshed_in_chunks_of_max_targets_oldest_first(clock, refresh):
    refresh.fixed, refresh.per_target = 0.01, 0.0001
    async with Batcher(
        refresh,
        settings=BatchingSettings(
            debounce=0.05, max_delay=1.0, max_targets=100, full_refresh_threshold=10_000
        ),
        clock=clock,
    ) as b:
        done: dict[str, float] = {}
        for i in range(250):
            submit(b, clock, f"v{i:03d}", done)
        await clock.advance(5.0)

    assert len(done) == 250
    assert [r.targets for r in refresh.runs] == [100, 100, 50]
    order = sorted(done, key=lambda ref: done[ref])
    assert order[:100] == [f"v{i:03d}" for i in range(100)]


# -- costs measured by an earlier run of the daemon ------------------------------


async def record_run(engine: Any, *, kind: str, targets: int, duration: float) -> None:
    manager_id = await _scalar(
        engine, select(schema.managers.c.id).where(schema.managers.c.name == "m1")
    )
    async with engine.begin() as conn:
        await conn.execute(
            insert(schema.refresh_runs).values(
                manager_id=manager_id,
                kind=kind,
                targets=targets,
                created=0,
                updated=0,
                archived=0,
                deleted=0,
                started_at=datetime.now(UTC),
                duration=duration,
                error=None,
            )
        )


async def _scalar(engine: Any, statement: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(statement)).scalar_one()


@pytest.mark.parametrize("seeded", [True, False])
async def test_a_restarted_daemon_escalates_from_the_costs_in_refresh_runs(
    persister, engine, clock, refresh, seeded
):
    # an earlier run measured: a full refresh takes 30 s, targeted ones 10 ms + 1 ms/target
    await record_run(engine, kind="full", targets=1, duration=30.0)
    for n in (1, 5, 20, 50, 100):
        await record_run(engine, kind="targeted", targets=n, duration=0.01 + 0.001 * n)
    async with Batcher(
        refresh,
        settings=BatchingSettings(debounce=0.05, max_targets=5000, full_refresh_threshold=50),
        clock=clock,
    ) as b:
        if seeded:
            await seed_costs(engine, b)
        done: dict[str, float] = {}
        for i in range(500):  # past the threshold; 0.5 s targeted against 30 s full
            submit(b, clock, f"x{i}", done)
        await clock.advance(40.0)

    assert len(done) == 500
    assert refresh.kinds() == (["targeted"] if seeded else ["full"])
