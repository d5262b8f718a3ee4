"""Commit order: a manager's refreshes overlap, but commit in the order they collected.

Flow: batch -> **refresh (collect | wait for the previous commit | persist)** -> ack.

With a collect function (:data:`CollectFn`) the batcher runs a targeted
refresh in two phases: it collects (cloud API calls, no transaction), then
persists (one transaction).  Once a manager's newest refresh has collected,
the manager's next targeted batch may start collecting while it persists.
This module holds the bookkeeping that keeps that safe, in process, per manager:

* at most two refreshes of a manager run at once: one persisting (or waiting
  to), one collecting; a full refresh (it collects while it persists) never
  overlaps another refresh of its manager;
* each refresh waits, before it persists, until the refresh dispatched before
  it has ended (committed or failed): commits follow collects in order, so an
  older collect never overwrites a newer commit (DESIGN.md 6);
* a target that arrives while a refresh runs is in the pending batch, whose
  collect starts after it arrived: it is refreshed after it (DESIGN.md 9).

When the batcher closes, :func:`cancel_running` cancels the running refreshes
and waits for them a bounded time.

Ownership of a manager across processes (several daemons) is a separate
concern; this ordering is in-process only and composes with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from daemon.model.targets import TargetCollection
from daemon.persistence.refresh_result import RefreshKind
from daemon.pipeline.clock import Clock

log = logging.getLogger(__name__)

PersistFn = Callable[[], Awaitable[object]]
"""Persists what a collect gathered (one transaction); returns a result for the hooks."""

CollectFn = Callable[[TargetCollection], Awaitable[PersistFn | None]]
"""Collects a targeted batch (no transaction) and returns how to persist it; None when
the batch cannot be collected ahead of the previous commit (it reads what that commit
writes): the batcher then runs the whole refresh in its turn, without overlap."""

MAX_OVERLAP = 2
"""Refreshes of one manager at once: one persisting, one collecting."""


class RunningRefresh:
    """One dispatched refresh of a manager, from dispatch to its end."""

    __slots__ = ("_ended", "_previous", "batch_size", "collected", "kind", "task")

    def __init__(self, kind: RefreshKind, *, batch_size: int, previous: RunningRefresh | None):
        self.kind = kind
        self.batch_size = batch_size
        self.collected = False
        """Its collect is over: the manager's next targeted batch may start collecting."""
        self.task: asyncio.Task[None] | None = None
        self._previous = previous
        self._ended = asyncio.Event()

    async def wait_turn(self) -> None:
        """Return once the refresh dispatched before this one has ended."""
        previous = self._previous
        if previous is not None:
            await previous._ended.wait()
            self._previous = None  # let it be collected

    def end(self) -> None:
        self._ended.set()
        self._previous = None


def may_start_another(running: list[RunningRefresh], next_kind: RefreshKind) -> bool:
    """Whether a batch of ``next_kind`` may be dispatched while ``running`` run."""
    if not running:
        return True
    if next_kind is RefreshKind.FULL or len(running) >= MAX_OVERLAP:
        return False
    return all(r.kind is RefreshKind.TARGETED and r.collected for r in running)


async def run_in_turn(
    running: RunningRefresh,
    collection: TargetCollection,
    kind: RefreshKind,
    *,
    refresh: Callable[[TargetCollection], Awaitable[object]],
    collect: CollectFn | None,
    clock: Clock,
    collected: Callable[[], None],
) -> tuple[object, float]:
    """Run one dispatched refresh, its commit in its turn; returns its result and the
    seconds its persist waited for the previous commit.

    A targeted refresh with a ``collect`` function collects first, then tells
    ``collected`` (the manager's next batch may collect now) and persists in its
    turn; otherwise the whole refresh runs in its turn.
    """
    persist = None
    if collect is not None and kind is RefreshKind.TARGETED:
        persist = await collect(collection)
    if persist is None:
        await running.wait_turn()
        return await refresh(collection), 0.0
    running.collected = True
    collected()
    before = clock.now()
    await running.wait_turn()
    waited = clock.now() - before
    return await persist(), waited


CANCEL_GRACE = 5.0
"""Seconds a closing batcher waits for its cancelled refreshes to end."""


async def cancel_running(
    running: Mapping[str, Sequence[RunningRefresh]], clock: Clock, grace: float
) -> list[str]:
    """Cancel every running refresh (per manager) and wait until they ended, at most
    ``grace`` seconds of ``clock`` time; returns the managers whose refreshes did not end.

    A refresh that does not end when cancelled (on Python 3.11 ``asyncio.wait_for`` can
    lose a cancellation that meets a result) is left behind with a warning: stopping the
    daemon stays bounded, and its events, never acknowledged, are read again.
    """
    tasks = {r.task: manager for manager, rs in running.items() for r in rs if r.task}
    if not tasks:
        return []
    ended = asyncio.Event()
    left = set(tasks)

    def one_ended(task: asyncio.Task[None]) -> None:
        left.discard(task)
        if not left:
            ended.set()

    for task in tasks:
        task.cancel()
        task.add_done_callback(one_ended)
    if await clock.wait_event(ended, clock.now() + grace):
        return []
    stuck = sorted({tasks[task] for task in left})
    log.warning(
        "refresh(es) of manager(s) %s did not end within %.0fs of being cancelled; left "
        "behind (their events stay unacknowledged and will be read again)",
        ", ".join(stuck),
        grace,
    )
    return stuck
