"""The daemon's HTTP endpoint: health, readiness, metrics, managers, manual refresh.

Flow: operator / Prometheus -> **http** -> (status of the pipeline | batcher.request_full / submit).

* ``GET /healthz``: 200 while the process runs its loop.
* ``GET /readyz``: 200 once the database answered, the schema is current and the
  catchers started, and until shutdown begins; 503 with the reason otherwise.
* ``GET /metrics``: Prometheus text format.
* ``GET /managers``: per manager: last refresh, last full refresh, last error,
  pending targets, refreshing now, deletions held by the mass-deletion guard.
* ``POST /refresh``: ``{"manager": "...", "targets": ["vms:vm-1", ...]}`` (no
  targets: full; ``"confirm_deletions": true``: a full refresh that applies the
  deletions the guard would hold); bearer-token authenticated like the webhook;
  202 with the number of targets queued, or 200 once committed with ``?wait=true``.

Binds to 127.0.0.1 by default ([http] listen).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon import schema
from daemon.acks import Ack, QueueFullError
from daemon.batcher import Batcher
from daemon.deletion_guard import held_deletions
from daemon.metrics import Metrics
from daemon.targets import Ref, Target

log = logging.getLogger(__name__)


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


def parse_target_spec(manager: str, spec: str) -> Target:
    collection, sep, ref = spec.partition(":")
    if not sep or not collection or not ref:
        raise ValueError(f"target {spec!r}: expected COLLECTION:REF")
    if "=" in ref:
        return Target(manager, collection, Ref(dict(p.split("=", 1) for p in ref.split(","))))
    return Target.of(manager, collection, ref)


@dataclass(slots=True)
class HttpDeps:
    engine: AsyncEngine
    batcher: Batcher
    metrics: Metrics
    readiness: Readiness
    managers: frozenset[str]
    token: str | None
    clock: Callable[[], float]
    confirm_deletions: Callable[[str], Awaitable[None]] | None = None
    """Arms the next full refresh of a manager to apply held deletions (the persister's)."""


def make_app(deps: HttpDeps) -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    routes = web.RouteTableDef()

    @routes.get("/healthz")
    async def healthz(_request: web.Request) -> web.Response:
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

    @routes.get("/managers")
    async def managers(_request: web.Request) -> web.Response:
        m = schema.managers
        async with deps.engine.connect() as conn:
            rows = (await conn.execute(select(m))).mappings().all()
            held = await held_deletions(conn)
        by_name = {r["name"]: r for r in rows}
        out = []
        for name in sorted(deps.managers):
            row = by_name.get(name)
            status = deps.batcher.manager_status(name)
            out.append(
                {
                    "name": name,
                    "provider": row["provider"] if row else None,
                    "last_refresh_at": _iso(row["last_refresh_at"]) if row else None,
                    "last_full_refresh_at": _iso(row["last_full_refresh_at"]) if row else None,
                    "last_refresh_error": row["last_refresh_error"] if row else None,
                    "last_refresh_error_at": _iso(row["last_refresh_error_at"]) if row else None,
                    "pending_targets": deps.batcher.pending_count(name),
                    "refreshing": status.in_flight,
                    "deletions_held": held.get(row["id"]) if row else None,
                    "deletions_confirmed_at": _iso(row["deletions_confirmed_at"]) if row else None,
                }
            )
        return web.json_response({"managers": out})

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
            targets = [parse_target_spec(manager, str(s)) for s in specs] or [Target.full(manager)]
            confirm = body.get("confirm_deletions", False)
            if not isinstance(confirm, bool):
                raise ValueError("confirm_deletions must be true or false")
            if confirm and specs:
                raise ValueError("confirm_deletions applies to a full refresh: give no targets")
            if confirm and deps.confirm_deletions is None:
                raise ValueError("this endpoint cannot confirm deletions")
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


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


async def start_site(app: web.Application, host: str, port: int) -> Callable[[], Awaitable[None]]:
    """Serve ``app``; returns the coroutine function that stops it."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    log.info("HTTP endpoint on http://%s:%d", host, port)
    return runner.cleanup
