"""Collector of one AwesomeCloud manager: full and targeted refreshes.

Flow: refresher -> **collector** -> client -> parser -> InventoryPage -> persister.

:class:`AwesomeConnection` is the provider's ``ManagerConnection``.  Entering
it opens the HTTP client (and, for ``endpoint = "embedded"``, first starts an
in-process simulator on a free loopback port); leaving closes them in reverse.

Guarantees:

- ``collect_full`` yields pages in dependency order: every page of flavors,
  images and security groups, then vms page by page, each vm page carrying
  the vms' disks, network ports and security group links.  Memory stays flat:
  at most the page being consumed and one page fetched ahead are held.
- ``collect_targeted`` fetches by id, ``ids_per_request`` at a time, and never
  lists a collection: the targeted vms, then the flavors, images and groups
  they refer to plus the targeted ones, yielded before the vms.  A targeted
  ref the cloud does not have is simply absent.  Targets of child collections
  (disks, ports) cannot be fetched without their vm and are ignored (the
  daemon resolves them to their vm first).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, aclosing
from types import TracebackType
from typing import Final, Self, TypeVar

from daemon.api import InventoryPage, TargetCollection
from providers.awesome_cloud.client import AwesomeClient, Sleep
from providers.awesome_cloud.parser import parse_page, parse_vms
from providers.awesome_cloud.settings import AwesomeCloudSettings
from providers.awesome_cloud.simulator.cloud import Cloud
from providers.awesome_cloud.simulator.server import SimulatorServer, churn_forever

log = logging.getLogger(__name__)

REFERENCED: Final = ("flavors", "images", "security_groups")
"""Top-level collections vms refer to, in the order they are collected."""
CHILDREN: Final = frozenset({"disks", "network_ports", "vm_security_groups"})

T = TypeVar("T")


class _Done:
    """Marks the end of a prefetched stream."""


_DONE: Final = _Done()


async def prefetch(source: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """Yield ``source``'s items, producing the next one while the current is consumed.

    At most one item is held ahead.  Errors of ``source`` surface at the
    consumer's next step; closing or cancelling the consumer cancels the
    fetch in flight and closes ``source``.
    """

    async def step() -> T | _Done:
        try:
            return await anext(source)
        except StopAsyncIteration:
            return _DONE

    pending = asyncio.ensure_future(step())
    try:
        while not isinstance(item := await pending, _Done):
            pending = asyncio.ensure_future(step())
            yield item
    finally:
        if not pending.done():
            pending.cancel()
        await asyncio.wait([pending])
        if not pending.cancelled():
            pending.exception()  # retrieved here; it was already raised to the consumer
        await source.aclose()


class AwesomeConnection:
    """An open connection to one AwesomeCloud manager (``async with`` opens it)."""

    def __init__(
        self, manager: str, settings: AwesomeCloudSettings, *, sleep: Sleep = asyncio.sleep
    ) -> None:
        self.manager = manager
        self.settings = settings
        self._sleep = sleep
        self._stack: AsyncExitStack | None = None
        self._client: AwesomeClient | None = None
        self._simulator: SimulatorServer | None = None
        self._api_totals = {"requests": 0, "throttled": 0}
        """Counts of the clients of earlier openings (a reopened connection keeps counting)."""

    def api_stats(self) -> dict[str, int]:
        """Requests sent to the API and throttled answers, since this object was made."""
        client = self._client
        now = {"requests": client.requests, "throttled": client.throttled} if client else {}
        return {k: v + now.get(k, 0) for k, v in self._api_totals.items()}

    @property
    def endpoint(self) -> str:
        """The URL of the API (of the embedded simulator once entered)."""
        if self._simulator is not None:
            return self._simulator.url
        return self.settings.endpoint

    @property
    def cloud(self) -> Cloud | None:
        """The in-process cloud when the endpoint is embedded (else None): mutate it freely."""
        return self._simulator.cloud if self._simulator is not None else None

    @property
    def simulator(self) -> SimulatorServer | None:
        """The embedded simulator server (faults, request stats), or None when remote."""
        return self._simulator

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError(f"connection of manager {self.manager} is already open")
        stack = AsyncExitStack()
        try:
            s = self.settings
            if s.is_embedded:
                cloud = await asyncio.to_thread(
                    Cloud.generate, vms=s.embedded_vms, seed=s.embedded_seed, name=s.embedded_name
                )
                token = s.token.reveal() if s.token is not None else None
                self._simulator = await stack.enter_async_context(
                    SimulatorServer(cloud, token=token)
                )
                if s.embedded_churn_per_second > 0:
                    churn = asyncio.create_task(
                        churn_forever(
                            cloud, per_second=s.embedded_churn_per_second, seed=s.embedded_seed
                        ),
                        name=f"awesome-churn-{self.manager}",
                    )
                    stack.push_async_callback(_cancel_and_wait, churn)
            self._client = await stack.enter_async_context(
                AwesomeClient(self.endpoint, s, manager=self.manager, sleep=self._sleep)
            )
        except BaseException:
            await stack.aclose()
            self._client = self._simulator = None
            raise
        self._stack = stack
        log.info("manager %s: connected to AwesomeCloud at %s", self.manager, self.endpoint)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._api_totals = self.api_stats()
        try:
            if stack is not None:
                await stack.aclose()
        finally:
            self._client = self._simulator = None

    def _require_client(self) -> AwesomeClient:
        if self._client is None:
            raise RuntimeError(f"connection of manager {self.manager} is not open")
        return self._client

    # -- full ---------------------------------------------------------------------------

    async def collect_full(self) -> AsyncGenerator[InventoryPage, None]:
        """Every object, page by page: flavors, images, security groups, then vms."""
        client = self._require_client()
        async with aclosing(prefetch(self._full_pages(client))) as pages:
            async for page in pages:
                yield page

    async def _full_pages(self, client: AwesomeClient) -> AsyncGenerator[InventoryPage, None]:
        for collection in (*REFERENCED, "vms"):
            count = 0
            listing = client.iter_pages(collection, page_size=self.settings.page_size)
            async with aclosing(listing) as items_pages:
                async for items in items_pages:
                    count += len(items)
                    yield parse_page(collection, items)
            log.debug("manager %s: listed %d %s", self.manager, count, collection)

    # -- targeted -----------------------------------------------------------------------

    async def collect_targeted(
        self, targets: TargetCollection
    ) -> AsyncGenerator[InventoryPage, None]:
        """The targeted objects, the objects targeted vms refer to first, then the vms."""
        if targets.is_full:
            log.debug("manager %s: targets ask for a full refresh", self.manager)
            async with aclosing(self.collect_full()) as pages:
                async for page in pages:
                    yield page
            return
        client = self._require_client()
        self._log_ignored(targets)
        chunk = self.settings.ids_per_request

        async with aclosing(
            client.iter_by_ids("vms", targets.references("vms"), chunk_size=chunk)
        ) as vm_chunks:
            vm_pages = [parse_vms(items) async for items in vm_chunks]

        wanted = {c: targets.references(c) for c in REFERENCED}
        for page in vm_pages:
            for vm in page.rows["vms"]:
                if vm["flavor"] is not None:
                    wanted["flavors"].add(vm["flavor"])
                if vm["image"] is not None:
                    wanted["images"].add(vm["image"])
            wanted["security_groups"].update(
                link["security_group"] for link in page.rows["vm_security_groups"]
            )
        for collection in REFERENCED:
            async with aclosing(
                client.iter_by_ids(collection, wanted[collection], chunk_size=chunk)
            ) as chunks:
                async for items in chunks:
                    yield parse_page(collection, items)
        for page in vm_pages:
            yield page
        log.debug(
            "manager %s: targeted refresh fetched %d vms and %s",
            self.manager,
            sum(len(p.rows["vms"]) for p in vm_pages),
            {c: len(refs) for c, refs in wanted.items()},
        )

    def _log_ignored(self, targets: TargetCollection) -> None:
        for association in sorted(targets.associations() - {"vms", *REFERENCED}):
            why = (
                "child targets need their vm (the daemon resolves them)"
                if association in CHILDREN
                else "not an AwesomeCloud collection"
            )
            log.debug(
                "manager %s: ignoring %d %s targets: %s",
                self.manager,
                len(targets.references(association)),
                association,
                why,
            )


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])
