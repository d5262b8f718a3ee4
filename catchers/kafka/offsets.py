"""At-least-once offset tracking for partitioned logs (Kafka and alike).

Flow: record -> **track** -> Target(s) + Ack -> batcher -> refresh committed
-> Ack done -> **ack** -> commit :meth:`OffsetTracker.committable`.

Events are acknowledged in any order (different managers refresh at
different speeds), but a partition's committed position must never pass an
event that is not yet acknowledged: after a crash the log is re-read from
there (DESIGN.md 7).  The committable position of a partition is therefore
``(highest offset such that every tracked offset <= it is acknowledged) + 1``:
the smallest unacknowledged offset, or one past the highest tracked offset
when none is pending.  Offsets never handed out (gaps in a compacted log)
do not hold the position back.

Each partition keeps a set of pending offsets and a min-heap of them with
lazy deletion: ``track`` and ``ack`` are O(log n) / O(1), ``committable`` is
amortised O(log n).  The tracker is transport- and asyncio-free.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)
"""A partition key, e.g. aiokafka's ``TopicPartition``."""


class _Partition:
    __slots__ = ("committed", "heap", "next", "pending")

    def __init__(self) -> None:
        self.pending: set[int] = set()
        self.heap: list[int] = []
        self.next: int | None = None
        """One past the highest offset tracked."""
        self.committed: int | None = None
        """The last position reported by :meth:`OffsetTracker.mark_committed`."""

    def lowest_pending(self) -> int | None:
        heap, pending = self.heap, self.pending
        while heap and heap[0] not in pending:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def committable(self) -> int | None:
        lowest = self.lowest_pending()
        if lowest is None:
            return self.next
        return lowest if self.next is None else min(lowest, self.next)


class OffsetTracker(Generic[P]):
    """Pending offsets per partition, and the position that is safe to commit."""

    __slots__ = ("_partitions",)

    def __init__(self) -> None:
        self._partitions: dict[P, _Partition] = {}

    def track(self, partition: P, offset: int) -> None:
        """Record that ``offset`` was handed out and is now awaiting its ack."""
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = _Partition()
        if offset in state.pending:
            return
        state.pending.add(offset)
        heapq.heappush(state.heap, offset)
        if state.next is None or offset >= state.next:
            state.next = offset + 1

    def track_many(self, partition: P, offsets: Iterable[int]) -> None:
        """:meth:`track` each of ``offsets`` (a fetched batch: one call, not one per record)."""
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = _Partition()
        pending, heap, push = state.pending, state.heap, heapq.heappush
        highest: int | None = None
        for offset in offsets:
            if offset in pending:
                continue
            pending.add(offset)
            push(heap, offset)
            if highest is None or offset > highest:
                highest = offset
        if highest is not None and (state.next is None or highest >= state.next):
            state.next = highest + 1

    def untrack(self, partition: P, offset: int) -> None:
        """Give back an offset that was not handed on after all: it will be read again.

        The committable position falls back to at most ``offset``.
        """
        state = self._partitions.get(partition)
        if state is None or offset not in state.pending:
            return
        state.pending.discard(offset)
        if state.next is not None and state.next > offset:
            state.next = offset
        if state.committed is not None and state.next is not None:
            state.next = max(state.next, state.committed)

    def ack(self, partition: P, offset: int) -> bool:
        """Mark ``offset`` acknowledged; False when it was not pending (e.g. revoked)."""
        state = self._partitions.get(partition)
        if state is None or offset not in state.pending:
            return False
        state.pending.discard(offset)
        return True

    def committable(self, partition: P) -> int | None:
        """The position to commit for ``partition``; None when nothing was tracked."""
        state = self._partitions.get(partition)
        return state.committable() if state is not None else None

    def to_commit(self, partitions: Iterable[P] | None = None) -> dict[P, int]:
        """Committable positions that advanced past the last :meth:`mark_committed`."""
        chosen = self._partitions if partitions is None else partitions
        result: dict[P, int] = {}
        for partition in chosen:
            state = self._partitions.get(partition)
            if state is None:
                continue
            position = state.committable()
            if position is not None and (state.committed is None or position > state.committed):
                result[partition] = position
        return result

    def mark_committed(self, positions: dict[P, int]) -> None:
        """Record positions that the broker accepted."""
        for partition, position in positions.items():
            state = self._partitions.get(partition)
            if state is not None and (state.committed is None or position > state.committed):
                state.committed = position

    def in_flight(self, partition: P) -> int:
        """How many offsets of ``partition`` await their ack."""
        state = self._partitions.get(partition)
        return len(state.pending) if state is not None else 0

    def total_in_flight(self, partitions: Iterable[P] | None = None) -> int:
        chosen = self._partitions if partitions is None else partitions
        return sum(self.in_flight(p) for p in chosen)

    def revoke(self, partitions: Iterable[P]) -> None:
        """Forget ``partitions``: later acks of their offsets are ignored."""
        for partition in partitions:
            self._partitions.pop(partition, None)

    def partitions(self) -> list[P]:
        return list(self._partitions)
