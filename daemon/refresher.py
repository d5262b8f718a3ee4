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
* Any failure is recorded on the manager and in ``refresh_runs`` and
  re-raised, so the batcher keeps the targets and retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass

from daemon.inventory import InventoryPage
from daemon.persister import Persister, utcnow
from daemon.provider import ManagerConnection
from daemon.refresh_result import RefreshKind, RefreshResult
from daemon.targets import Target, TargetCollection

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RefreshableManager:
    """A configured manager with its open provider connection."""

    name: str
    provider: str
    connection: ManagerConnection
    allow_targeted_refresh: bool = True


class Refresher:
    def __init__(self, persister: Persister, managers: Mapping[str, RefreshableManager]) -> None:
        self._persister = persister
        self._managers = managers

    async def refresh(self, targets: TargetCollection) -> RefreshResult:
        """Refresh ``targets`` (one manager); raises when the refresh failed."""
        manager = self._managers.get(targets.manager)
        if manager is None:
            raise LookupError(f"unknown manager {targets.manager!r}")
        await self._persister.ensure_manager(manager.name, manager.provider)
        if not targets.is_full and not manager.allow_targeted_refresh:
            log.debug("manager %s: targeted refresh disabled, refreshing fully", manager.name)
            targets = TargetCollection(manager.name, [Target.full(manager.name)])
        if targets.is_full:
            async with aclosing(prefetched(manager.connection.collect_full())) as pages:
                return await self._persister.save(manager.name, pages, targets=targets)
        return await self._targeted(manager, targets)

    async def _targeted(
        self, manager: RefreshableManager, targets: TargetCollection
    ) -> RefreshResult:
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
        # a list, not a stream: the persister can save it again if a row must be isolated
        result = await self._persister.save(manager.name, pages, targets=resolved)
        result.extra["collect_seconds"] = collect_time
        log.debug(
            "manager %s: targeted refresh collected %d page(s) in %.3fs",
            manager.name,
            len(pages),
            collect_time,
        )
        return result


async def prefetched(
    pages: AsyncIterator[InventoryPage], depth: int = 1
) -> AsyncGenerator[InventoryPage, None]:
    """Yield ``pages`` while fetching up to ``depth`` pages ahead in a task."""
    queue: asyncio.Queue[InventoryPage | BaseException | None] = asyncio.Queue(maxsize=depth)

    async def pump() -> None:
        try:
            async for page in pages:
                await queue.put(page)
            await queue.put(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            await queue.put(exc)

    task = asyncio.create_task(pump(), name="refreshd-prefetch")
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        await asyncio.wait([task])  # unlike `await task`, never swallows our own cancellation
        aclose = getattr(pages, "aclose", None)
        if aclose is not None:
            await aclose()
