"""The refresher: runs collector -> parser -> persister for one TargetCollection.

Flow: batcher -> **refresher** -> provider connection (collector + parser) -> persister.

* A manager with ``allow_targeted_refresh = false`` gets a full refresh for
  any batch.
* Targets on child collections are resolved to their parents first; the
  targets a collector expanded on its own (``InventoryPage.expanded``) join
  the deletion scope.
* A targeted refresh collects everything *before* opening its transaction
  (short transaction, short lock); a full refresh streams pages into one
  transaction, with the next page fetched while the current one is written.
* :meth:`Refresher.collect` splits a targeted refresh in two: it collects and
  returns how to persist what it collected, so that the batcher may collect a
  manager's next batch while this one persists (daemon.pipeline.commit_order keeps the
  commits in collect order).  ``refresh`` is ``collect`` followed by its persist.
* Any failure is recorded on the manager and in ``refresh_runs`` and
  re-raised, so the batcher keeps the targets and retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass

from daemon.model.provider import ManagerConnection
from daemon.model.targets import Target, TargetCollection
from daemon.persistence.persister import Persister, utcnow
from daemon.persistence.refresh_result import RefreshKind, RefreshResult
from daemon.pipeline.page_batches import prefetched
from daemon.pipeline.progress import ProgressBoard, counted

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RefreshableManager:
    """A configured manager with its open provider connection."""

    name: str
    provider: str
    connection: ManagerConnection
    allow_targeted_refresh: bool = True


class Refresher:
    def __init__(
        self,
        persister: Persister,
        managers: Mapping[str, RefreshableManager],
        *,
        progress: ProgressBoard | None = None,
    ) -> None:
        self._persister = persister
        self._managers = managers
        self._progress = progress if progress is not None else ProgressBoard()

    async def refresh(self, targets: TargetCollection) -> RefreshResult:
        """Refresh ``targets`` (one manager); raises when the refresh failed."""
        manager = self._managers.get(targets.manager)
        if manager is None:
            raise LookupError(f"unknown manager {targets.manager!r}")
        await self._persister.ensure_manager(manager.name, manager.provider)
        if not targets.is_full and not manager.allow_targeted_refresh:
            log.debug("manager %s: targeted refresh disabled, refreshing fully", manager.name)
            targets = TargetCollection(
                manager.name, [Target.full(manager.name, trigger=targets.trigger)]
            )
        if targets.is_full:
            return await self._full(manager, targets)
        persist = await self._collect_targeted(manager, targets)
        return await persist()

    async def collect(
        self, targets: TargetCollection
    ) -> Callable[[], Awaitable[RefreshResult]] | None:
        """Collect a targeted refresh of ``targets``; returns how to persist it.

        Nothing is written until the returned function is awaited (one
        transaction).  Returns None, having done nothing, when the refresh cannot
        be collected ahead of the manager's previous commit: a full refresh
        (requested, or the manager does not allow targeted refreshes) collects
        while it persists, and targets on child collections are resolved to their
        parents from the database, which the previous commit may change.
        """
        manager = self._managers.get(targets.manager)
        if manager is None:
            raise LookupError(f"unknown manager {targets.manager!r}")
        if targets.is_full or not manager.allow_targeted_refresh:
            return None
        registry = self._persister.collections
        if any(a in registry and registry[a].is_child for a in targets.associations()):
            return None
        await self._persister.ensure_manager(manager.name, manager.provider)
        return await self._collect_targeted(manager, targets)

    async def _full(self, manager: RefreshableManager, targets: TargetCollection) -> RefreshResult:
        board = self._progress
        progress = board.start(
            manager.name, kind=RefreshKind.FULL, trigger=targets.trigger, targets=len(targets)
        )
        try:
            async with (
                aclosing(prefetched(manager.connection.collect_full())) as pages,
                aclosing(counted(pages, board, progress)) as seen,
            ):
                return await self._persister.save(manager.name, seen, targets=targets)
        finally:
            board.finish(progress)

    async def _collect_targeted(
        self, manager: RefreshableManager, targets: TargetCollection
    ) -> Callable[[], Awaitable[RefreshResult]]:
        started, t0 = utcnow(), time.perf_counter()
        try:
            resolved = await self._persister.resolve_targets(targets)
            async with aclosing(manager.connection.collect_targeted(resolved)) as collected:
                pages = [p async for p in collected]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._persister.record_failure(
                manager.name,
                kind=RefreshKind.TARGETED,
                trigger=targets.trigger,
                targets=len(targets),
                started_at=started,
                duration=time.perf_counter() - t0,
                error=exc,
            )
            raise
        collect_time = time.perf_counter() - t0
        expanded = [t for page in pages for t in page.expanded]
        if expanded:
            resolved = TargetCollection(manager.name, [*resolved, *expanded])
        log.debug(
            "manager %s: targeted refresh collected %d page(s) in %.3fs",
            manager.name,
            len(pages),
            collect_time,
        )
        scope = resolved

        async def persist() -> RefreshResult:
            board = self._progress
            progress = board.start(
                manager.name,
                kind=RefreshKind.TARGETED,
                trigger=targets.trigger,
                targets=len(targets),
            )
            try:
                for page in pages:
                    board.page(progress, sum(len(rows) for rows in page.rows.values()))
                # a list, not a stream: the persister can save it again if a row must be
                # isolated
                result = await self._persister.save(manager.name, pages, targets=scope)
            finally:
                board.finish(progress)
            result.extra["collect_seconds"] = collect_time
            return result

        return persist
