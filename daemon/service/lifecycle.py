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

Steps 2 and 5 are bounded by a deadline of ``shutdown_timeout + SHUTDOWN_MARGIN``
from the stop signal, so a catcher whose stream does not answer cannot hold the
exit (``refreshd run`` also exits at once a few seconds past that deadline).
Health (``/healthz``, ``/readyz``, ``/managers`` and the watchdog) comes from
:mod:`daemon.service.health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import fields, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.catcher import (
    Catcher,
    CatcherContext,
    ManagerEndpoint,
    load_catcher,
)
from daemon.model.provider import load_provider
from daemon.model.targets import TargetCollection
from daemon.persistence import schema
from daemon.persistence.db import Dialect, create_engine, dialect_of, normalize_url
from daemon.persistence.migrate import upgrade
from daemon.persistence.persister import Persister
from daemon.persistence.refresh_result import PersisterSettings, RefreshKind, RefreshResult
from daemon.persistence.retention import prune_forever
from daemon.pipeline.batcher import Batcher, BatchingSettings, RefreshHooks
from daemon.pipeline.clock import LOOP_CLOCK, Clock
from daemon.pipeline.ownership import (
    LocalOwnership,
    OwnershipSettings,
    PostgresOwnership,
    default_instance_name,
    fenced,
    fenced_collect,
)
from daemon.pipeline.progress import ProgressBoard
from daemon.pipeline.refresher import RefreshableManager, Refresher
from daemon.pipeline.scheduler import Scheduler
from daemon.service.config import BatchingConfig, Config, LoadedConfig
from daemon.service.health import DatabaseWatch, Liveness, ManagerMemory
from daemon.service.http import HttpDeps, Readiness, make_app, start_site
from daemon.service.metrics import CatcherProbe, MeteredSink, Metrics, ProviderStats
from daemon.service.status_page import add_status_page
from daemon.service.systemd import Notifier
from daemon.service.version import refreshd_version

log = logging.getLogger(__name__)

SHUTDOWN_MARGIN = 15.0
"""Seconds past ``shutdown_timeout`` that stopping catchers and closing them may take."""


def batching_settings(base: BatchingSettings, *layers: BatchingConfig) -> BatchingSettings:
    """``base`` with the keys set in each ``[batching]`` layer applied in order."""
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    for layer in layers:
        values.update(layer.overrides())
    return BatchingSettings(**values)


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
        freeze_heap: bool = False,
    ) -> None:
        """``freeze_heap``: once started, exempt what start-up allocated from garbage
        collection (``gc.freeze``; ``refreshd run`` does, a daemon embedded in another
        program need not)."""
        self.loaded = loaded
        self.config: Config = loaded.config
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.freeze_heap = freeze_heap
        self.readiness = Readiness()
        self.metrics = Metrics(version=refreshd_version())
        self.progress = ProgressBoard()
        self.catcher_probes: list[CatcherProbe] = []
        self.batcher: Batcher | None = None
        self.catchers: list[Catcher] = []
        self.sink: MeteredSink | None = None
        self.rows_written = 0
        self.refreshes_ok = 0
        self.refreshes_failed = 0
        self.memory = ManagerMemory()
        self.liveness = Liveness(
            batcher=lambda: self.batcher,
            catchers=self.catchers,
            clock=clock,
            shutdown_timeout=self.config.shutdown_timeout,
        )
        self._deadline: float | None = None
        """Loop time by which stopping and closing the catchers must be over."""

    # -- hooks from the batcher ---------------------------------------------------

    def _on_start(self, manager: str, collection: TargetCollection) -> None:
        self.metrics.refresh_started("full" if collection.is_full else "targeted")

    def _on_success(self, manager: str, collection: TargetCollection, result: object) -> None:
        self.refreshes_ok += 1
        self.liveness.progressed()
        self.memory.succeeded(manager, full=collection.is_full, at=datetime.now(UTC))
        if isinstance(result, RefreshResult):
            self.rows_written += result.rows_written
            self.metrics.refresh_succeeded(result)

    def _on_failure(self, manager: str, collection: TargetCollection, exc: BaseException) -> None:
        self.refreshes_failed += 1
        self.liveness.progressed()
        self.memory.failed(manager, message=f"{type(exc).__name__}: {exc}", at=datetime.now(UTC))
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
        cfg = self.loaded.usable().config
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
                provider = load_provider(m.provider)
                connection = provider.connect(m.name, self.loaded.provider_settings[m.name])
                await stack.enter_async_context(connection)
                manager_ids[m.name] = await persister.ensure_manager(m.name, m.provider)
                refreshable[m.name] = RefreshableManager(
                    m.name, m.provider, connection, m.allow_targeted_refresh
                )
                endpoints[m.name] = ManagerEndpoint.of(m.name, m.provider, provider, connection)

            base = batching_settings(BatchingSettings(), cfg.batching)
            refresher = Refresher(persister, refreshable, progress=self.progress)
            ownership = self._ownership(engine, manager_ids, lambda: batcher)
            batcher = Batcher(
                fenced(refresher.refresh, ownership, _manager_of),
                # a manager's next batch collects while one persists
                collect=fenced_collect(refresher.collect, ownership, _manager_of),
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
            await seed_costs(engine, batcher)
            sink = MeteredSink(batcher, self.metrics, self.clock.now)
            self.sink = sink
            token = cfg.http.token.reveal() if cfg.http.token is not None else None
            app_deps = HttpDeps(
                engine=engine,
                batcher=batcher,
                metrics=self.metrics,
                readiness=self.readiness,
                managers=frozenset(refreshable),
                token=token,
                clock=self.clock.now,
                health=self.health_problems,
                memory=self.memory,
                progress=self.progress,
                catchers=self.catcher_probes,
                confirm_deletions=persister.confirm_deletions,
                ownership=ownership,
            )
            app = make_app(app_deps)
            add_status_page(
                app, app_deps, intervals={m.name: m.refresh_interval for m in cfg.managers}
            )
            context = CatcherContext(
                sink=sink, managers=endpoints, clock=self.clock.now, http_app=app, token=token
            )
            for c in cfg.catchers:
                options = c.options | ({"name": c.name} if c.name else {})
                self.catchers.append(load_catcher(c.type)(options, context))
            self.catcher_probes += [CatcherProbe(c.name, c.stats, c.healthy) for c in self.catchers]
            self.metrics.register_pipeline(
                batcher_stats=lambda: _as_dict(batcher.stats),
                pending=lambda: {m: batcher.pending_count(m) for m in refreshable},
                catchers=self.catcher_probes,
                providers=_api_stats(refreshable),
            )
            last_success = await _last_success(engine)
            for m in cfg.managers:
                self.metrics.manager_configured(
                    m.name, interval=m.refresh_interval, last_success=last_success.get(m.name, {})
                )
            self.metrics.register_ownership(ownership)

            host, port = cfg.http.host_port
            stack.push_async_callback(await start_site(app, host, port))
            await ownership.start()
            stack.push_async_callback(ownership.stop)  # after the batcher closed
            await stack.enter_async_context(_closing_batcher(batcher))
            for catcher in self.catchers:
                await catcher.start()
                stack.push_async_callback(self._closer(catcher))
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
            self.liveness.progressed()
            database = DatabaseWatch(
                engine, reasons=self.readiness.reasons, on_back=persister.record_unrecorded
            )
            loops = [
                asyncio.create_task(scheduler.run(), name="refreshd-scheduler"),
                asyncio.create_task(self._status_loop(), name="refreshd-status"),
                asyncio.create_task(
                    prune_forever(engine, keep=cfg.persister.keep_runs, clock=self.clock),
                    name="refreshd-retention",
                ),
            ]
            if self.notifier.watchdog_interval:
                loops.append(asyncio.create_task(self._watchdog_loop(), name="refreshd-watchdog"))
            if self.freeze_heap:
                _freeze_start_up_heap()
            try:
                self.readiness.reasons.clear()
                loops.append(asyncio.create_task(database.run(), name="refreshd-database-watch"))
                self.notifier.ready(self.status_line())
                log.info(
                    "refreshd ready: %d manager(s), %d catcher(s)",
                    len(refreshable),
                    len(self.catchers),
                )
                await stop.wait()
                self._deadline = self.clock.now() + cfg.shutdown_timeout + SHUTDOWN_MARGIN
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
            await self._by_deadline(catcher.stop(), f"catcher {catcher.name}: stopping")
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

    def health_problems(self) -> list[str]:
        """Why the pipeline cannot make progress (empty: healthy); ``/healthz`` and the
        watchdog both use it."""
        return self.liveness.problems()

    def healthy(self) -> bool:
        """The pipeline makes progress: batcher running, catchers alive, nothing stuck."""
        return not self.health_problems()

    async def _by_deadline(self, step: Awaitable[None], what: str) -> None:
        """Await ``step`` until the shutdown deadline at most (then it is cancelled)."""
        if self._deadline is None:
            await step
            return
        try:
            async with asyncio.timeout_at(self._deadline):
                await step
        except TimeoutError:
            log.warning("%s: still not done at the shutdown deadline; given up", what)

    def _closer(self, catcher: Catcher) -> Callable[[], Awaitable[None]]:
        async def close() -> None:
            try:
                await self._by_deadline(catcher.close(), f"catcher {catcher.name}: closing")
            except Exception:
                log.exception("catcher %s: close failed", catcher.name)

        return close

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval
        assert interval is not None
        while True:
            problems = self.health_problems()
            if not problems:
                self.notifier.watchdog()
            else:
                log.error(
                    "pipeline unhealthy (%s): not pinging the systemd watchdog",
                    "; ".join(problems),
                )
            await self.clock.sleep_until(self.clock.now() + interval)


def _api_stats(managers: dict[str, RefreshableManager]) -> dict[str, ProviderStats]:
    """The connections that count their API requests (``api_stats()``), by manager."""
    out: dict[str, ProviderStats] = {}
    for name, m in managers.items():
        read = getattr(m.connection, "api_stats", None)
        if callable(read):
            out[name] = read
    return out


async def _last_success(engine: AsyncEngine) -> dict[str, dict[str, float]]:
    """Per manager and kind, when its last successful refresh started (Unix seconds; a
    conservative seed for the freshness gauge, which later runs set to their end)."""
    runs, m = schema.refresh_runs, schema.managers
    query = (
        select(m.c.name, runs.c.kind, func.max(runs.c.started_at))
        .join(m, m.c.id == runs.c.manager_id)
        .where(runs.c.error.is_(None))
        .group_by(m.c.name, runs.c.kind)
    )
    out: dict[str, dict[str, float]] = {}
    async with engine.connect() as conn:
        for name, kind, started in (await conn.execute(query)).all():
            if started is not None:
                if started.tzinfo is None:
                    started = started.replace(tzinfo=UTC)
                out.setdefault(name, {})[kind] = started.timestamp()
    return out


def _freeze_start_up_heap() -> None:
    """Move what start-up allocated (modules, config, connections) out of the garbage
    collector's reach: full collections then scan only what the pipeline allocates."""
    gc.collect()
    gc.freeze()


def _as_dict(stats: object) -> dict[str, Any]:
    return {k: getattr(stats, k) for k in dir(stats) if not k.startswith("_")}


def _full_only(settings: BatchingSettings) -> BatchingSettings:
    return replace(settings, targeted_refresh=False)


@contextlib.asynccontextmanager
async def _closing_batcher(batcher: Batcher) -> Any:
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.close(cancel=True)


async def seed_costs(engine: AsyncEngine, batcher: Batcher, runs_per_manager: int = 20) -> None:
    """Start from the durations of each manager's recent successful refreshes in
    ``refresh_runs`` (oldest first), so that a daemon started on a backlog times its
    batches and decides escalation from measurements, not from the threshold alone."""
    r, m = schema.refresh_runs, schema.managers
    recent = (
        select(m.c.name, r.c.kind, r.c.targets, r.c.duration, r.c.id)
        .join(m, m.c.id == r.c.manager_id)
        .where(r.c.error.is_(None))
        .order_by(r.c.id.desc())
        .limit(runs_per_manager * 20)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(recent)).all()
    newest: dict[str, list[Any]] = {}
    for row in rows:  # newest first
        kept = newest.setdefault(row.name, [])
        if len(kept) < runs_per_manager:
            kept.append(row)
    for row in reversed([row for kept in newest.values() for row in kept]):
        kind = RefreshKind.FULL if row.kind == RefreshKind.FULL.value else RefreshKind.TARGETED
        batcher.record_cost(row.name, kind, targets=row.targets, duration=row.duration)


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
