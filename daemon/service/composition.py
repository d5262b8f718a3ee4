"""The composition root: the one place that builds the refresh pipeline from a validated config.

Flow: config -> **composition** (engine -> migrate -> Persister -> provider connections ->
Refresher -> ownership + Batcher) -> ``refreshd run`` (lifecycle) | ``refreshd refresh`` |
``refreshd check-config`` (preflight) | test harnesses | benches.

Use::

    async with assemble(loaded) as parts:           # engine, schema, persister, connections
        await parts.refresher.refresh(collection)   # one refresh (``refreshd refresh``)
        pipeline = await parts.pipeline()           # ownership + batcher (``refreshd run``)
        async with pipeline.running():              # started; closed in reverse on exit
            pipeline.batcher.submit(targets, ack)

Everything :func:`assemble` opens (provider connections, an engine it created) is
closed in reverse order when the block ends.  What needs no I/O (each manager's
batching settings, the catchers' view of the managers, building a catcher) is
here too, so that ``check-config`` validates with the same code ``run`` starts with.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, fields, replace

from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.catcher import (
    Catcher,
    CatcherContext,
    ManagerEndpoint,
    load_catcher,
)
from daemon.model.provider import ManagerConnection, UnknownProviderError, load_provider
from daemon.model.targets import TargetCollection
from daemon.persistence.db import Dialect, create_engine, dialect_of, normalize_url
from daemon.persistence.migrate import upgrade
from daemon.persistence.persister import Persister
from daemon.persistence.settings import PersisterSettings
from daemon.pipeline.batcher import NO_HOOKS, Batcher, BatchingSettings, RefreshHooks
from daemon.pipeline.clock import LOOP_CLOCK, Clock
from daemon.pipeline.ownership import (
    LocalOwnership,
    default_instance_name,
    fenced,
    fenced_collect,
)
from daemon.pipeline.postgres_ownership import PostgresOwnership
from daemon.pipeline.progress import ProgressBoard
from daemon.pipeline.refresher import RefreshableManager, Refresher
from daemon.service.config import BatchingConfig, CatcherConfig, Config, LoadedConfig
from daemon.service.run_history import seed_costs


class NotStarted(Exception):
    """``ready`` said no (a stop arrived while waiting for the database): nothing was built."""


@dataclass(frozen=True, slots=True)
class Pipeline:
    """Who may refresh which manager, and the batcher that runs the refreshes."""

    ownership: LocalOwnership | PostgresOwnership
    batcher: Batcher

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Batcher]:
        """Ownership started, then the batcher; on exit the batcher closes (refreshes
        still running are cancelled), then ownership stops."""
        await self.ownership.start()
        try:
            self.batcher.start()
            try:
                yield self.batcher
            finally:
                await self.batcher.close(cancel=True)
        finally:
            await self.ownership.stop()


@dataclass(slots=True)
class Parts:
    """What :func:`assemble` built: open until its ``async with`` block ends."""

    config: Config
    engine: AsyncEngine
    revision: str | None
    """The schema revision the database is at (migrated)."""
    persister: Persister
    managers: dict[str, RefreshableManager]
    """The configured managers (those asked for) with their open provider connections."""
    manager_ids: dict[str, int]
    refresher: Refresher

    def connection(self, manager: str) -> ManagerConnection:
        return self.managers[manager].connection

    async def pipeline(
        self, *, clock: Clock = LOOP_CLOCK, hooks: RefreshHooks = NO_HOOKS
    ) -> Pipeline:
        """Ownership and a batcher over :attr:`refresher` (not started: :meth:`Pipeline.running`),
        its cost estimates seeded from the recent ``refresh_runs``."""
        holder: list[Batcher] = []
        ownership = build_ownership(self.config, self.engine, self.manager_ids, lambda: holder[0])
        base, overrides = batching_of(self.config, self.managers)
        batcher = Batcher(
            fenced(self.refresher.refresh, ownership, _manager_of),
            # a manager's next batch collects while one persists
            collect=fenced_collect(self.refresher.collect, ownership, _manager_of),
            settings=base,
            overrides=overrides,
            clock=clock,
            hooks=hooks,
            may_start=ownership.may_start,
        )
        holder.append(batcher)
        await seed_costs(self.engine, batcher)
        return Pipeline(ownership, batcher)


@contextlib.asynccontextmanager
async def assemble(
    loaded: LoadedConfig,
    *,
    engine: AsyncEngine | None = None,
    managers: Collection[str] | None = None,
    progress: ProgressBoard | None = None,
    ready: Callable[[AsyncEngine], Awaitable[bool]] | None = None,
    persister: Callable[[AsyncEngine], Persister] | None = None,
) -> AsyncIterator[Parts]:
    """Open the database (``engine``, else one created from ``database_url`` and disposed
    at the end), wait for ``ready`` (False: :class:`NotStarted`), migrate the schema, and
    connect every configured manager (only ``managers`` when given) in config order.
    ``persister`` builds the persister instead of the ``[persister]`` table (a bench
    comparing settings that are not config keys).

    Raises ConfigError when the config is unusable (a deferred problem)."""
    cfg = loaded.usable().config
    async with AsyncExitStack() as stack:
        if engine is None:
            engine = create_engine(cfg.database_url)
            stack.push_async_callback(engine.dispose)
        if ready is not None and not await ready(engine):
            raise NotStarted
        revision = await upgrade(engine)
        saver = (
            persister(engine)
            if persister is not None
            else Persister(engine, settings=persister_settings(cfg))
        )
        refreshable: dict[str, RefreshableManager] = {}
        manager_ids: dict[str, int] = {}
        for m in cfg.managers:
            if managers is not None and m.name not in managers:
                continue
            connection = load_provider(m.provider).connect(m.name, loaded.provider_settings[m.name])
            await stack.enter_async_context(connection)
            manager_ids[m.name] = await saver.ensure_manager(m.name, m.provider)
            refreshable[m.name] = RefreshableManager(
                m.name, m.provider, connection, m.allow_targeted_refresh
            )
        yield Parts(
            config=cfg,
            engine=engine,
            revision=revision,
            persister=saver,
            managers=refreshable,
            manager_ids=manager_ids,
            refresher=Refresher(saver, refreshable, progress=progress),
        )


def persister_settings(config: Config) -> PersisterSettings:
    """The ``[persister]`` table as the persister takes it."""
    p = config.persister
    return PersisterSettings(
        max_delete_ratio=p.max_delete_ratio, mass_delete_min_rows=p.mass_delete_min_rows
    )


def batching_settings(base: BatchingSettings, *layers: BatchingConfig) -> BatchingSettings:
    """``base`` with the keys set in each ``[batching]`` layer applied in order."""
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    for layer in layers:
        values.update(layer.overrides())
    return BatchingSettings(**values)


def batching_of(
    config: Config, managers: Collection[str] | None = None
) -> tuple[BatchingSettings, dict[str, BatchingSettings]]:
    """The global batching settings (``[batching]``) and each manager's (its own
    ``[managers.batching]`` over them; every batch full without targeted refresh)."""
    base = batching_settings(BatchingSettings(), config.batching)
    overrides = {}
    for m in config.managers:
        if managers is not None and m.name not in managers:
            continue
        own = batching_settings(base, m.batching)
        # a manager without targeted refresh: every batch is full at dispatch
        if not m.allow_targeted_refresh:
            own = replace(own, targeted_refresh=False)
        overrides[m.name] = own
    return base, overrides


def build_ownership(
    config: Config,
    engine: AsyncEngine,
    manager_ids: dict[str, int],
    batcher: Callable[[], Batcher],
) -> LocalOwnership | PostgresOwnership:
    """Who may refresh which manager: every one on SQLite, the owned ones on PostgreSQL."""
    instance = config.instance_name or default_instance_name()
    if dialect_of(engine) is Dialect.SQLITE:
        return LocalOwnership(manager_ids, instance=instance)
    return PostgresOwnership(
        normalize_url(config.database_url),
        managers=manager_ids,
        instance=instance,
        work=_LazyWork(batcher),
        settings=config.ownership.settings(),
        on_acquired=lambda _manager: batcher().wake(),
    )


def endpoints_of(
    config: Config, connections: Mapping[str, RefreshableManager] | None = None
) -> dict[str, ManagerEndpoint]:
    """What catchers may know of each manager: its provider's event mapping and routing
    key and, when connected, its connection (a manager whose provider is not installed
    is left out: the configuration check reports it)."""
    endpoints = {}
    for m in config.managers:
        try:
            provider = load_provider(m.provider)
        except UnknownProviderError:
            continue
        managed = connections.get(m.name) if connections is not None else None
        connection = managed.connection if managed is not None else None
        endpoints[m.name] = ManagerEndpoint.of(m.name, m.provider, provider, connection)
    return endpoints


def build_catcher(catcher: CatcherConfig, context: CatcherContext) -> Catcher:
    """The catcher a ``[[catchers]]`` block configures (constructors do no I/O)."""
    options = catcher.options | ({"name": catcher.name} if catcher.name else {})
    return load_catcher(catcher.type)(options, context)


def _manager_of(collection: TargetCollection) -> str:
    return collection.manager


class _LazyWork:
    """The batcher, as ownership sees it (built after ownership, which it needs)."""

    def __init__(self, batcher: Callable[[], Batcher]) -> None:
        self._batcher = batcher

    def pending_count(self, manager: str | None = None) -> int:
        return self._batcher().pending_count(manager)

    def in_flight_managers(self) -> frozenset[str]:
        return self._batcher().in_flight_managers()
