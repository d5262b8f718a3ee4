"""The daemon's lifecycle: one owner of every resource, opened in order, closed in reverse.

Flow: **lifecycle** starts database -> provider connections -> ownership -> batcher (refresher,
persister) -> HTTP endpoint -> catchers -> scheduler; READY=1; runs until a stop
signal; then shuts down in the written order (docs/operations.md):

1. readiness goes 503, systemd is told STOPPING=1;
2. catchers stop taking events in (Kafka stops fetching, the webhook answers 503);
3. the batcher stops accepting targets and flushes every pending batch at once;
4. in-flight and flushed refreshes get ``shutdown_timeout`` to commit (a manager
   waiting out a retry delay that ends after it is not waited for);
5. catchers acknowledge what was committed (Kafka commits offsets) and close;
6. refreshes still running are cancelled (their events stay unacknowledged
   and are re-read after restart: at-least-once), the HTTP endpoint closes,
   provider connections close, the database engine is disposed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import fields, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon import schema
from daemon.batcher import Batcher, BatchingSettings, RefreshHooks
from daemon.catcher import (
    Catcher,
    CatcherContext,
    ManagerEndpoint,
    UnknownPluginError,
    load_catcher,
    load_event_mapper,
)
from daemon.clock import LOOP_CLOCK, Clock
from daemon.config import BatchingConfig, Config, LoadedConfig
from daemon.db import Dialect, create_engine, dialect_of, normalize_url
from daemon.http import HttpDeps, Readiness, make_app, start_site
from daemon.metrics import MeteredSink, Metrics
from daemon.migrate import upgrade
from daemon.ownership import (
    LocalOwnership,
    OwnershipSettings,
    PostgresOwnership,
    default_instance_name,
    fenced,
)
from daemon.persister import Persister
from daemon.provider import EventMapper, load_provider
from daemon.refresh_result import PersisterSettings, RefreshResult
from daemon.refresher import RefreshableManager, Refresher
from daemon.scheduler import Scheduler
from daemon.systemd import Notifier
from daemon.targets import Target, TargetCollection

log = logging.getLogger(__name__)


def batching_settings(base: BatchingSettings, *layers: BatchingConfig) -> BatchingSettings:
    """``base`` with the keys set in each ``[batching]`` layer applied in order."""
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    for layer in layers:
        values.update(layer.overrides())
    return BatchingSettings(**values)


def _no_mapper(provider: str) -> EventMapper:
    def mapper(manager: str, event: dict[str, Any]) -> list[Target]:
        raise LookupError(f"provider {provider!r} has no event mapper installed")

    return mapper


async def wait_for_database(engine: AsyncEngine, stop: asyncio.Event, readiness: Readiness) -> bool:
    """Wait until the database answers (backoff 1 s .. 30 s); False if stopped first."""
    delay = 1.0
    while not stop.is_set():
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            readiness.reasons.discard("database unavailable")
            return True
        except Exception as exc:  # noqa: BLE001 - any driver error means "not yet"
            reason = exc
        readiness.reasons.add("database unavailable")
        log.warning("database not answering (%s); retrying in %.0fs", reason, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 30.0)
    return False


class Daemon:
    """Everything ``refreshd run`` runs, for one config."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        notifier: Notifier | None = None,
        clock: Clock = LOOP_CLOCK,
    ) -> None:
        self.loaded = loaded
        self.config: Config = loaded.config
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.readiness = Readiness()
        self.metrics = Metrics()
        self.batcher: Batcher | None = None
        self.catchers: list[Catcher] = []
        self.sink: MeteredSink | None = None
        self.rows_written = 0
        self.refreshes_ok = 0
        self.refreshes_failed = 0
        self._last_progress = 0.0

    # -- hooks from the batcher ---------------------------------------------------

    def _on_start(self, manager: str, collection: TargetCollection) -> None:
        self.metrics.refresh_started("full" if collection.is_full else "targeted")

    def _on_success(self, manager: str, collection: TargetCollection, result: object) -> None:
        self.refreshes_ok += 1
        self._last_progress = self.clock.now()
        if isinstance(result, RefreshResult):
            self.rows_written += result.rows_written
            self.metrics.refresh_succeeded(result)

    def _on_failure(self, manager: str, collection: TargetCollection, exc: BaseException) -> None:
        self.refreshes_failed += 1
        self._last_progress = self.clock.now()
        kind = "full" if collection.is_full else "targeted"
        self.metrics.refresh_failed(manager, kind)
        log.warning("manager %s: %s refresh failed: %s: %s", manager, kind, type(exc).__name__, exc)

    # -- running --------------------------------------------------------------------

    def _ownership(
        self, engine: AsyncEngine, manager_ids: dict[str, int], batcher: Callable[[], Batcher]
    ) -> LocalOwnership | PostgresOwnership:
        """Who may refresh which manager: every one on SQLite, the owned ones on PostgreSQL."""
        cfg = self.config
        instance = cfg.instance_name or default_instance_name()
        if dialect_of(engine) is Dialect.SQLITE:
            return LocalOwnership(manager_ids, instance=instance)
        return PostgresOwnership(
            normalize_url(cfg.database_url),
            managers=manager_ids,
            instance=instance,
            work=_LazyWork(batcher),
            settings=OwnershipSettings(
                keepalive=cfg.ownership.keepalive,
                session_timeout=cfg.ownership.session_timeout,
                release_after=cfg.ownership.release_after,
                save_idle_timeout=cfg.ownership.save_idle_timeout,
            ),
            on_acquired=lambda _manager: batcher().wake(),
        )

    async def run(self, stop: asyncio.Event) -> int:
        cfg = self.config
        async with AsyncExitStack() as stack:
            engine = create_engine(cfg.database_url)
            stack.push_async_callback(engine.dispose)
            if not await wait_for_database(engine, stop, self.readiness):
                return 0
            revision = await upgrade(engine)
            log.info("database schema at revision %s", revision)
            persister = Persister(
                engine,
                settings=PersisterSettings(
                    max_delete_ratio=cfg.persister.max_delete_ratio,
                    mass_delete_min_rows=cfg.persister.mass_delete_min_rows,
                ),
            )
            refreshable: dict[str, RefreshableManager] = {}
            manager_ids: dict[str, int] = {}
            endpoints: dict[str, ManagerEndpoint] = {}
            for m in cfg.managers:
                connection = load_provider(m.provider).connect(
                    m.name, self.loaded.provider_settings[m.name]
                )
                await stack.enter_async_context(connection)
                manager_ids[m.name] = await persister.ensure_manager(m.name, m.provider)
                refreshable[m.name] = RefreshableManager(
                    m.name, m.provider, connection, m.allow_targeted_refresh
                )
                try:
                    mapper = load_event_mapper(m.provider)
                except UnknownPluginError:
                    mapper = _no_mapper(m.provider)
                endpoints[m.name] = ManagerEndpoint(m.name, m.provider, mapper, connection)

            base = batching_settings(BatchingSettings(), cfg.batching)
            ownership = self._ownership(engine, manager_ids, lambda: batcher)
            batcher = Batcher(
                fenced(Refresher(persister, refreshable).refresh, ownership, _manager_of),
                settings=base,
                overrides={
                    # a manager without targeted refresh: every batch is full at dispatch
                    m.name: _full_only(batching_settings(base, m.batching))
                    if not m.allow_targeted_refresh
                    else batching_settings(base, m.batching)
                    for m in cfg.managers
                },
                clock=self.clock,
                hooks=RefreshHooks(
                    on_start=self._on_start,
                    on_success=self._on_success,
                    on_failure=self._on_failure,
                ),
                may_start=ownership.may_start,
            )
            self.batcher = batcher
            sink = MeteredSink(batcher, self.metrics, self.clock.now)
            self.sink = sink
            token = cfg.http.token.reveal() if cfg.http.token is not None else None
            app = make_app(
                HttpDeps(
                    engine=engine,
                    batcher=batcher,
                    metrics=self.metrics,
                    readiness=self.readiness,
                    managers=frozenset(refreshable),
                    ownership=ownership,
                    token=token,
                    clock=self.clock.now,
                )
            )
            context = CatcherContext(
                sink=sink, managers=endpoints, clock=self.clock.now, http_app=app, token=token
            )
            for c in cfg.catchers:
                options = c.options | ({"name": c.name} if c.name else {})
                self.catchers.append(load_catcher(c.type)(options, context))
            self.metrics.register_pipeline(
                batcher_stats=lambda: _as_dict(batcher.stats),
                pending=lambda: {m: batcher.pending_count(m) for m in refreshable},
                catchers=[(c.name, c.stats) for c in self.catchers],
            )
            self.metrics.register_ownership(ownership)

            host, port = cfg.http.host_port
            stack.push_async_callback(await start_site(app, host, port))
            await ownership.start()
            stack.push_async_callback(ownership.stop)  # after the batcher closed
            await stack.enter_async_context(_closing_batcher(batcher))
            for catcher in self.catchers:
                await catcher.start()
                stack.push_async_callback(_closer(catcher))
                log.info("catcher %s started", catcher.name)

            scheduler = Scheduler(
                batcher,
                intervals={m.name: m.refresh_interval for m in cfg.managers},
                clock=self.clock,
                ownership=ownership,
                last_full=lambda name: _last_full_of(engine, name),
                recheck=max(1.0, 5 * cfg.ownership.keepalive),
            )
            scheduler.plan(await _last_full(engine), now_wall=datetime.now(UTC))
            self._last_progress = self.clock.now()
            loops = [
                asyncio.create_task(scheduler.run(), name="refreshd-scheduler"),
                asyncio.create_task(self._status_loop(), name="refreshd-status"),
            ]
            if self.notifier.watchdog_interval:
                loops.append(asyncio.create_task(self._watchdog_loop(), name="refreshd-watchdog"))
            try:
                self.readiness.reasons.clear()
                self.notifier.ready(self.status_line())
                log.info(
                    "refreshd ready: %d manager(s), %d catcher(s)",
                    len(refreshable),
                    len(self.catchers),
                )
                await stop.wait()
                await self._shutdown(batcher)
            finally:
                for task in loops:
                    task.cancel()
                await asyncio.wait(loops)
        self.notifier.close()
        log.info("refreshd stopped")
        return 0

    async def _shutdown(self, batcher: Batcher) -> None:
        self.readiness.reasons.add("stopping")
        self.notifier.stopping()
        log.info("shutting down: stopping catchers")
        for catcher in self.catchers:
            await catcher.stop()
        batcher.stop()
        log.info("flushing %d pending target(s)", batcher.pending_count())
        await batcher.flush()
        if await batcher.drain(self.config.shutdown_timeout):
            log.info("all refreshes committed")
        elif not batcher.in_flight_managers() and (late := batcher.waiting_to_retry()):
            for manager, count in sorted(late.items()):
                log.warning(
                    "manager %s: %d target(s) wait for a retry after the shutdown deadline; "
                    "their events stay unacknowledged and will be re-read",
                    manager,
                    count,
                )
        else:
            log.warning(
                "shutdown_timeout (%.0fs) reached with refreshes in flight; their events "
                "stay unacknowledged and will be re-read",
                self.config.shutdown_timeout,
            )

    # -- status and watchdog --------------------------------------------------------

    def status_line(self) -> str:
        b = self.batcher
        pending = b.pending_count() if b else 0
        events = self.sink.events_submitted if self.sink else 0
        lat = self.metrics.recent_latency()
        latency = (
            f"latency p50 {lat[0] * 1000:.0f}ms p99 {lat[1] * 1000:.0f}ms" if lat else "latency -"
        )
        return (
            f"events in {events}, targets pending {pending}, refreshes done "
            f"{self.refreshes_ok} (failed {self.refreshes_failed}), rows written "
            f"{self.rows_written}, {latency}"
        )

    async def _status_loop(self) -> None:
        interval = max(self.config.status_interval, 0.1)
        while True:
            await self.clock.sleep_until(self.clock.now() + interval)
            line = self.status_line()
            log.info("status: %s", line)
            self.notifier.status(line)

    def healthy(self) -> bool:
        """The pipeline makes progress: batcher running, catchers alive, nothing stuck."""
        b = self.batcher
        if b is None or not b.running:
            return False
        if not all(c.healthy() for c in self.catchers):
            return False
        stalled_for = self.clock.now() - self._last_progress
        limit = 3 * self.config.shutdown_timeout + 600
        return b.pending_count() == 0 or not b.in_flight_managers() or stalled_for < limit

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval
        assert interval is not None
        while True:
            if self.healthy():
                self.notifier.watchdog()
            else:
                log.error("pipeline unhealthy: not pinging the systemd watchdog")
            await self.clock.sleep_until(self.clock.now() + interval)


def _as_dict(stats: object) -> dict[str, Any]:
    return {k: getattr(stats, k) for k in dir(stats) if not k.startswith("_")}


def _full_only(settings: BatchingSettings) -> BatchingSettings:
    return replace(settings, full_refresh_threshold=1)


def _closer(catcher: Catcher) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        try:
            await catcher.close()
        except Exception:
            log.exception("catcher %s: close failed", catcher.name)

    return close


@contextlib.asynccontextmanager
async def _closing_batcher(batcher: Batcher) -> Any:
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.close(cancel=True)


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


async def _last_full_of(engine: AsyncEngine, name: str) -> datetime | None:
    m = schema.managers
    async with engine.connect() as conn:
        value: datetime | None = (
            await conn.execute(select(m.c.last_full_refresh_at).where(m.c.name == name))
        ).scalar()
    return value


async def _last_full(engine: AsyncEngine) -> dict[str, datetime | None]:
    m = schema.managers
    async with engine.connect() as conn:
        rows = (await conn.execute(select(m.c.name, m.c.last_full_refresh_at))).all()
    return {r.name: r.last_full_refresh_at for r in rows}
