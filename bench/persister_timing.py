"""Where a save's time goes, measured from outside the persister: the wait for each page
(collect not hidden by prefetch) and wall seconds per persister phase.

Flow: refresher -> **timed page stream** -> persister (phases wrapped) -> database.

Bench-side only: these wrap the persister's methods at run time; a refactored
persister still runs (missing methods are skipped, with fewer phases reported).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PageTiming:
    """What a save's page stream cost the consumer (the persister)."""

    pages: int = 0
    rows: int = 0
    rows_by_collection: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wait: float = 0.0
    """Seconds the persister waited for the next page (collect not hidden by prefetch)."""


async def timed(
    items: AsyncIterable[Any], timing: PageTiming, *, count_wait: bool = True, pages: bool = True
) -> AsyncIterator[Any]:
    """``items`` as they come, the wait for each added to ``timing.wait`` (``count_wait``)
    and, when they are pages (``pages``), their pages and rows counted."""
    it = aiter(items)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                item = await anext(it)
            except StopAsyncIteration:
                if count_wait:
                    timing.wait += time.perf_counter() - t0
                return
            if count_wait:
                timing.wait += time.perf_counter() - t0
            if pages:
                timing.pages += 1
                for name, rows in item.rows.items():
                    timing.rows += len(rows)
                    timing.rows_by_collection[name] += len(rows)
            yield item
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


def instrument_persister(persister: Any) -> Callable[[], PageTiming]:
    """Wrap ``persister.save`` so each call's page stream is timed; returns a getter
    of the last call's :class:`PageTiming`."""
    original = persister.save
    last: list[PageTiming] = [PageTiming()]
    # a persister that merges pages into save batches (daemon/pipeline/page_batches.py) reads
    # pages in a task of its own: then its wait is for batches, timed around them
    # (their pages are counted by the page stream)
    from daemon.persistence import saver as saver_module

    batches = getattr(saver_module, "coalesced", None)
    if batches is not None and not getattr(batches, "_bench_timed", False):

        def coalesced(pages: AsyncIterable[Any], **kw: Any) -> AsyncIterator[Any]:
            return timed(batches(pages, **kw), last[0], pages=False)

        coalesced._bench_timed = True  # type: ignore[attr-defined]
        saver_module.coalesced = coalesced  # type: ignore[attr-defined]

    async def save(manager: str, pages: AsyncIterable[Any], **kw: Any) -> Any:
        timing = PageTiming()
        last[0] = timing
        return await original(manager, timed(pages, timing, count_wait=batches is None), **kw)

    persister.save = save
    return lambda: last[0]


class PhaseTimer:
    """Wall seconds per persister phase, by wrapping its methods (bench-side only).

    Phases: begin (pool checkout + pre-ping + BEGIN), lock, prepare (temp tables),
    pages (stage + statements), sweep, record, commit.  Missing methods are skipped,
    so a refactored persister still runs (with fewer phases reported).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = False

    _active: PhaseTimer | None = None
    _wrapped = False

    @staticmethod
    def _wrap(owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                timer = PhaseTimer._active
                if timer is not None and timer.enabled:
                    timer.seconds[phase] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    def attach(self) -> None:
        """Make this the timer the (class-wide, once-installed) wrappers report to."""
        PhaseTimer._active = self
        if PhaseTimer._wrapped:
            return
        PhaseTimer._wrapped = True
        from daemon.persistence import dialect, persister, saver, staging, sweeper

        W = dialect.WriteTransaction
        self._wrap(W, "__aenter__", "begin")
        self._wrap(W, "__aexit__", "commit")
        self._wrap(saver, "lock_manager", "advisory lock")  # as the saver calls it
        self._wrap(staging.Stager, "prepare", "temp tables prepare")
        self._wrap(sweeper.Sweeper, "count_active", "count_active")
        self._wrap(saver.StagedSaver, "_save_page", "pages")
        self._wrap(sweeper.Sweeper, "sweep_full", "sweep")
        self._wrap(sweeper.Sweeper, "sweep_targeted", "sweep")
        self._wrap(saver, "record_run", "record run")
        self._wrap(persister.Persister, "resolve_targets", "resolve targets")

    def activate(self) -> None:
        PhaseTimer._active = self

    @contextlib.contextmanager
    def recording(self) -> Iterator[PhaseTimer]:
        self.seconds.clear()
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False
