"""Save batches for a full refresh: collector pages merged up to a row budget.

Flow: collector -> parser -> pages -> **save batches** -> persister.

A full refresh saves each batch with a fixed number of statements per collection
(stage load, skeletal inserts, one diff save, on PostgreSQL a ``TRUNCATE`` of the
stage), whatever its size.  Collectors page as their cloud API likes (500 objects
by default for awesome_cloud), so the persister merges consecutive pages until a
batch holds ``min_rows`` rows: 100k vms with 1000-vm pages took 19.5 s of CPU
with the collector's pages as batches, 16.7 s with 5000-vm pages
(bench/RESULTS.md).

The next batch is assembled by a task while the current one is saved, so the
collection of the pages it needs stays hidden behind saving.  At most two batches
(the one being saved and the one being assembled) are held, so memory stays flat.
Merging changes nothing a refresh decides: rows of a batch are saved in
dependency order and one per key (the last wins), exactly as consecutive pages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator

from daemon.model.inventory import InventoryPage

FULL_BATCH_ROWS = 20_000
"""Rows (all collections together) a full refresh's save batch holds at least."""


def _merge(into: InventoryPage, page: InventoryPage) -> None:
    for name, rows in page.rows.items():
        into.extend(name, rows)
    into.expanded.extend(page.expanded)
    into.rejected.extend(page.rejected)


async def _merged(
    pages: AsyncIterable[InventoryPage], min_rows: int
) -> AsyncGenerator[InventoryPage, None]:
    batch = InventoryPage()
    try:
        async for page in pages:
            _merge(batch, page)
            if len(batch) >= min_rows:
                yield batch
                batch = InventoryPage()
        if len(batch) or batch.expanded or batch.rejected:
            yield batch
    finally:
        aclose = getattr(pages, "aclose", None)
        if aclose is not None:
            await aclose()


def coalesced(
    pages: AsyncIterable[InventoryPage], *, min_rows: int = FULL_BATCH_ROWS
) -> AsyncGenerator[InventoryPage, None]:
    """Yield ``pages`` merged into batches of at least ``min_rows`` rows (the last may
    hold fewer), assembling the next batch in a task while the current is consumed."""
    return prefetched(_merged(pages, min_rows), depth=1)


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
