"""The daemon's HTTP endpoint: health, readiness, metrics, managers, manual refresh.

Flow: operator / Prometheus -> **http** -> (status of the pipeline | batcher.request_full / submit).

* ``GET /healthz``: 200 while the pipeline can make progress; 503 with the reasons
  when a catcher died or is wedged or the pipeline is stuck (``daemon.service.health``;
  the systemd watchdog uses the same check).
* ``GET /readyz``: 200 once the database answered, the schema is current and the
  catchers started, until shutdown begins, and while the database answers its
  probes; 503 with the reasons otherwise.
* ``GET /metrics``: Prometheus text format.
* ``GET /managers``: per manager: last refresh, last full refresh, last error,
  pending targets, refreshing now and, while it does, its ``progress`` (kind,
  trigger, pages, rows, rows/s).  While the database does not answer (within
  ``PROBE_TIMEOUT``) it answers from memory (``"source": "memory"``): the last
  rows read, updated with what this process saw since.  ``deletions_held``: what the
  mass-deletion guard holds back; ``owner``, ``owner_since``, ``owned_here``: which
  process owns it since when (docs/scaling.md).
* ``GET /``: the status page (daemon/service/status_page.py).
* ``POST /refresh``: ``{"manager": "...", "targets": ["vms:vm-1", ...]}`` (no
  targets: full; ``"confirm_deletions": true``: a full refresh that applies the
  deletions the guard would hold); bearer-token authenticated like the webhook;
  202 with the number of targets queued, or 200 once committed with ``?wait=true``.

Binds to 127.0.0.1 by default ([http] listen).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.acks import Ack, QueueFullError
from daemon.model.inventory import COLLECTIONS
from daemon.model.targets import Target, TargetSpecError, Trigger, parse_target
from daemon.persistence import schema
from daemon.persistence.deletion_guard import held_deletions
from daemon.pipeline.batcher import Batcher
from daemon.pipeline.ownership import Owner, Ownership
from daemon.pipeline.progress import ProgressBoard
from daemon.service.health import PROBE_TIMEOUT, ManagerMemory, ManagerSeen
from daemon.service.metrics import Metrics
from daemon.service.scrape_collectors import CatcherProbe

log = logging.getLogger(__name__)

HANDLER_GRACE = 2.0
"""Seconds requests still being answered get when the endpoint closes."""


@dataclass(slots=True)
class Readiness:
    """Why the daemon is not ready yet (empty: ready)."""

    reasons: set[str] = field(default_factory=lambda: {"starting"})

    @property
    def ready(self) -> bool:
        return not self.reasons


def bearer_ok(request: web.Request, token: str | None) -> bool:
    """Constant-time check of ``Authorization: Bearer <token>`` (no token configured: open)."""
    if token is None:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())


def unauthorized() -> web.Response:
    return web.json_response(
        {"error": "missing or invalid bearer token"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="refreshd"'},
    )


@dataclass(slots=True)
class HttpDeps:
    engine: AsyncEngine
    batcher: Batcher
    metrics: Metrics
    readiness: Readiness
    managers: frozenset[str]
    token: str | None
    clock: Callable[[], float]
    health: Callable[[], list[str]]
    """Liveness problems (empty: healthy), ``daemon.service.health.Liveness.problems``."""
    memory: ManagerMemory
    """What this process saw of each manager's refreshes (for ``/managers`` without database)."""
    ownership: Ownership
    """Which managers this process owns (daemon/pipeline/ownership.py)."""
    progress: ProgressBoard = field(default_factory=ProgressBoard)
    catchers: Sequence[CatcherProbe] = ()
    """Filled once the catchers are built (after the app: webhooks add routes to it)."""
    confirm_deletions: Callable[[str], Awaitable[None]] | None = None
    """Arms the next full refresh of a manager to apply held deletions (the persister's)."""


def make_app(deps: HttpDeps) -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    routes = web.RouteTableDef()

    @routes.get("/healthz")
    async def healthz(_request: web.Request) -> web.Response:
        problems = deps.health()
        if problems:
            return web.json_response({"status": "unhealthy", "reasons": problems}, status=503)
        return web.json_response({"status": "ok"})

    @routes.get("/readyz")
    async def readyz(_request: web.Request) -> web.Response:
        if deps.readiness.ready:
            return web.json_response({"status": "ready"})
        return web.json_response(
            {"status": "not ready", "reasons": sorted(deps.readiness.reasons)}, status=503
        )

    @routes.get("/metrics")
    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(deps.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    last_rows: dict[str, Any] = {}
    last_held: dict[int, Any] = {}
    last_owners: dict[str, Owner] = {}

    @routes.get("/managers")
    async def managers(_request: web.Request) -> web.Response:
        m = schema.managers
        source = "database"
        held: dict[int, Any] = {}
        owners: dict[str, Owner] = {}
        try:
            async with asyncio.timeout(PROBE_TIMEOUT), deps.engine.connect() as conn:
                rows = (await conn.execute(select(m))).mappings().all()
                held = await held_deletions(conn)
                owners = await deps.ownership.owners(conn)
            last_rows.clear()
            last_rows.update({r["name"]: dict(r) for r in rows})
            last_held.clear()
            last_held.update(held)
            last_owners.clear()
            last_owners.update(owners)
        except Exception as exc:  # noqa: BLE001 - any driver error or timeout: answer from memory
            log.warning("GET /managers: database unavailable (%s); answering from memory", exc)
            source = "memory"
            held = dict(last_held)
            owners = dict(last_owners)
        out = []
        for name in sorted(deps.managers):
            row = last_rows.get(name) or {}
            if source == "memory":
                row = _merged(row, deps.memory.get(name))
            status = deps.batcher.manager_status(name)
            owner = owners.get(name)
            out.append(
                {
                    "name": name,
                    "provider": row.get("provider"),
                    "last_refresh_at": _iso(row.get("last_refresh_at")),
                    "last_full_refresh_at": _iso(row.get("last_full_refresh_at")),
                    "last_refresh_error": row.get("last_refresh_error"),
                    "last_refresh_error_at": _iso(row.get("last_refresh_error_at")),
                    "pending_targets": deps.batcher.pending_count(name),
                    "refreshing": status.in_flight,
                    "progress": deps.progress.current(name),
                    "deletions_held": held.get(row["id"]) if row.get("id") is not None else None,
                    "deletions_confirmed_at": _iso(row.get("deletions_confirmed_at")),
                    "owner": owner.instance if owner else None,
                    "owner_since": _iso(owner.since) if owner else None,
                    "owned_here": deps.ownership.holding(name) is not None,
                }
            )
        return web.json_response({"managers": out, "source": source})

    @routes.post("/refresh")
    async def refresh(request: web.Request) -> web.Response:
        if not bearer_ok(request, deps.token):
            return unauthorized()
        try:
            body: Any = await request.json()
            manager = body["manager"]
            specs = body.get("targets") or []
            if manager not in deps.managers:
                raise ValueError(f"unknown manager {manager!r}")
            if not isinstance(specs, list):
                raise ValueError("targets must be a list of COLLECTION:REF strings")
            targets = [parse_target(manager, str(s), COLLECTIONS) for s in specs] or [
                Target.full(manager, trigger=Trigger.MANUAL)
            ]
            confirm = body.get("confirm_deletions", False)
            if not isinstance(confirm, bool):
                raise ValueError("confirm_deletions must be true or false")
            if confirm and specs:
                raise ValueError("confirm_deletions applies to a full refresh: give no targets")
            if confirm and deps.confirm_deletions is None:
                raise ValueError("this endpoint cannot confirm deletions")
        except TargetSpecError as exc:
            return web.json_response({"error": f"bad request: target {exc}"}, status=400)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        if confirm and deps.confirm_deletions is not None:
            try:
                await deps.confirm_deletions(manager)
            except (OSError, SQLAlchemyError) as exc:
                log.warning("manager %s: could not record the confirmation: %s", manager, exc)
                return web.json_response(
                    {"error": "the database is unavailable; try again"},
                    status=503,
                    headers={"Retry-After": "5"},
                )
        ack = Ack(received_at=deps.clock())
        try:
            deps.batcher.submit(targets, ack)
        except QueueFullError as exc:
            return web.json_response(
                {"error": str(exc) or "queue full"}, status=503, headers={"Retry-After": "5"}
            )
        if request.query.get("wait") in ("1", "true"):
            await ack.wait()
            return web.json_response({"status": "committed", "targets": len(targets)})
        return web.json_response({"status": "queued", "targets": len(targets)}, status=202)

    app.add_routes(routes)
    return app


def _merged(row: dict[str, Any] | None, seen: ManagerSeen) -> dict[str, Any]:
    """The last ``managers`` row read, with what this process saw since laid over it."""
    merged = dict(row or {})
    for key in ("last_refresh_at", "last_full_refresh_at"):
        value = getattr(seen, key)
        if value is not None and (merged.get(key) is None or _after(value, merged[key])):
            merged[key] = value
    at = seen.last_refresh_error_at
    if at is not None and (
        merged.get("last_refresh_error_at") is None or _after(at, merged["last_refresh_error_at"])
    ):
        merged["last_refresh_error_at"] = at
        merged["last_refresh_error"] = seen.last_refresh_error
    return merged


def _after(a: datetime, b: datetime) -> bool:
    if (a.tzinfo is None) != (b.tzinfo is None):
        a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
    return a > b


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


async def start_site(app: web.Application, host: str, port: int) -> Callable[[], Awaitable[None]]:
    """Serve ``app``; returns the coroutine function that stops it."""
    # requests still open when it closes get HANDLER_GRACE, not aiohttp's default minute
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=HANDLER_GRACE
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    log.info("HTTP endpoint on http://%s:%d", host, port)
    return runner.cleanup
