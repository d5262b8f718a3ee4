"""Offset tracking: the committed position never passes an unacknowledged offset."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from catchers.kafka.offsets import OffsetTracker

P0, P1 = ("t", 0), ("t", 1)


def test_nothing_tracked_means_nothing_to_commit() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    assert tracker.committable(P0) is None
    assert tracker.to_commit() == {}
    assert tracker.in_flight(P0) == 0


def test_committable_stops_at_the_first_unacked_offset() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    for offset in range(10, 15):
        tracker.track(P0, offset)
    assert tracker.committable(P0) == 10

    tracker.ack(P0, 11)
    tracker.ack(P0, 13)
    assert tracker.committable(P0) == 10
    assert tracker.in_flight(P0) == 3

    tracker.ack(P0, 10)
    assert tracker.committable(P0) == 12

    tracker.ack(P0, 12)
    tracker.ack(P0, 14)
    assert tracker.committable(P0) == 15
    assert tracker.in_flight(P0) == 0


def test_gaps_in_the_log_do_not_hold_the_position_back() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    for offset in (3, 7, 8):  # compacted: 4..6 were never handed out
        tracker.track(P0, offset)
    tracker.ack(P0, 3)
    assert tracker.committable(P0) == 7
    tracker.ack(P0, 8)
    tracker.ack(P0, 7)
    assert tracker.committable(P0) == 9


def test_partitions_are_independent_and_to_commit_reports_only_advances() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.track(P0, 0)
    tracker.track(P1, 5)
    tracker.ack(P1, 5)
    assert tracker.to_commit() == {P0: 0, P1: 6}

    tracker.mark_committed({P0: 0, P1: 6})
    assert tracker.to_commit() == {}
    tracker.ack(P0, 0)
    assert tracker.to_commit() == {P0: 1}
    assert tracker.to_commit([P1]) == {}


def test_ack_of_unknown_or_revoked_offsets_is_ignored() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.track(P0, 1)
    assert tracker.ack(P0, 2) is False
    assert tracker.ack(P1, 1) is False
    assert tracker.ack(P0, 1) is True
    assert tracker.ack(P0, 1) is False

    tracker.track(P1, 4)
    tracker.revoke([P1])
    assert tracker.ack(P1, 4) is False
    assert tracker.committable(P1) is None
    assert tracker.partitions() == [P0]


def test_untrack_gives_an_offset_back() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.track(P0, 0)
    tracker.ack(P0, 0)
    tracker.track(P0, 1)
    tracker.untrack(P0, 1)  # the sink refused it: it will be read again
    assert tracker.committable(P0) == 1
    assert tracker.in_flight(P0) == 0
    tracker.track(P0, 1)
    tracker.ack(P0, 1)
    assert tracker.committable(P0) == 2


def test_tracking_twice_is_harmless() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.track(P0, 4)
    tracker.track(P0, 4)
    assert tracker.in_flight(P0) == 1
    tracker.ack(P0, 4)
    assert tracker.committable(P0) == 5


def test_many_in_flight_offsets_are_cheap() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    count = 100_000
    started = time.perf_counter()
    for offset in range(count):
        tracker.track(P0, offset)
    for offset in range(count - 1, -1, -1):  # worst order: the lowest is acked last
        tracker.ack(P0, offset)
        if offset % 1000 == 0:
            tracker.committable(P0)
    assert tracker.committable(P0) == count
    assert time.perf_counter() - started < 5.0  # O(n log n): well under a second in practice


@given(
    offsets=st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=80, unique=True),
    data=st.data(),
)
def test_random_ack_orders_never_pass_an_unacked_offset(
    offsets: list[int], data: st.DataObject
) -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    handed_out = sorted(offsets)  # a partition hands offsets out in increasing order
    for offset in handed_out:
        tracker.track(P0, offset)
    ack_order = data.draw(st.permutations(handed_out))
    acked: set[int] = set()
    previous = tracker.committable(P0)
    for offset in ack_order:
        tracker.ack(P0, offset)
        acked.add(offset)
        position = tracker.committable(P0)
        assert position is not None and previous is not None
        assert position >= previous, "the position never moves back"
        assert all(o in acked for o in handed_out if o < position), "passed an unacked offset"
        unacked = [o for o in handed_out if o not in acked]
        assert position == (min(unacked) if unacked else handed_out[-1] + 1)
        previous = position
    assert tracker.committable(P0) == handed_out[-1] + 1
    assert tracker.in_flight(P0) == 0


@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["track", "ack", "commit"]), st.integers(0, 30)), max_size=120
    )
)
def test_interleaved_tracks_acks_and_commits(steps: list[tuple[str, int]]) -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    next_offset = 0
    pending: set[int] = set()
    committed = -1  # nothing committed yet
    for action, n in steps:
        if action == "track":
            tracker.track(P0, next_offset)
            pending.add(next_offset)
            next_offset += 1 + n % 3  # sometimes leave gaps
        elif action == "ack" and pending:
            offset = sorted(pending)[n % len(pending)]
            tracker.ack(P0, offset)
            pending.discard(offset)
        elif action == "commit":
            advanced = tracker.to_commit()
            if advanced:
                assert advanced[P0] > committed
                committed = advanced[P0]
                tracker.mark_committed(advanced)
        assert committed <= (min(pending) if pending else next_offset)
        assert tracker.in_flight(P0) == len(pending)


@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["track_many", "untrack", "ack", "commit"]),
            st.lists(st.integers(0, 40), max_size=6),
        ),
        max_size=60,
    )
)
def test_track_many_is_track_of_each_offset(steps: list[tuple[str, list[int]]]) -> None:
    """A fetched batch tracked at once behaves exactly like its records tracked one by one."""
    batched: OffsetTracker[tuple[str, int]] = OffsetTracker()
    single: OffsetTracker[tuple[str, int]] = OffsetTracker()
    for action, offsets in steps:
        if action == "track_many":
            batched.track_many(P0, offsets)
            for offset in offsets:
                single.track(P0, offset)
        elif action == "untrack":
            for offset in offsets:
                batched.untrack(P0, offset)
                single.untrack(P0, offset)
        elif action == "ack":
            for offset in offsets:
                assert batched.ack(P0, offset) == single.ack(P0, offset)
        else:
            advanced = batched.to_commit()
            assert advanced == single.to_commit()
            batched.mark_committed(advanced)
            single.mark_committed(advanced)
        assert batched.committable(P0) == single.committable(P0)
        assert batched.in_flight(P0) == single.in_flight(P0)
