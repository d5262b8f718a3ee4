"""The AwesomeCloud simulator over HTTP: read API, admin API, faults, and how to run it.

Flow: simulator.cloud (Cloud) -> **simulator.app** (HTTP) -> client -> collector -> parser.

Routes (all JSON):

- ``GET /api/v1/{collection}?limit=&page_token=`` pages in id order
  (``{"items": [...], "next_page_token": str|null}``);
  ``GET /api/v1/{collection}?ids=a,b`` returns only those (unknown ids omitted).
- ``POST /admin/v1/{collection}``, ``PATCH|DELETE /admin/v1/{collection}/{id}``
  mutate the cloud (400 / 404 / 409 on bad input, unknown id, duplicate id).
- ``GET /admin/v1/events?after=N&limit=`` reads the CloudEvents log.
- ``POST|GET|DELETE /admin/v1/faults`` sets, shows and clears fault injection;
  ``GET|DELETE /admin/v1/stats`` shows and resets read-API request counts.

Faults, request counting and the optional bearer token apply to the read API
only.  Fault decisions draw from an injected ``random.Random``, so a test that
seeds it sees the same failures every run.  :class:`SimulatorServer` runs the
app on a TCP port (port 0 = a free one) and stops it on exit;
:func:`serve` / :func:`run_simulator` run it standalone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from random import Random
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from providers.awesome_cloud.simulator.cloud import BadRequestError, Cloud, SimulatorError

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 5000
MAX_EVENTS_PER_READ = 10_000


class FaultPlan(BaseModel):
    """What the read API does wrong, as posted to ``/admin/v1/faults``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_rate: float = Field(0.0, ge=0, le=1, description="Share of requests that fail, 0..1.")
    status: int = Field(503, ge=400, le=599, description="HTTP status of a failed request.")
    latency_ms: int = Field(0, ge=0, description="Delay added to every read, in milliseconds.")
    retry_after: float | None = Field(
        None, ge=0, description="Retry-After seconds sent with a 429/503 failure; none if null."
    )
    count: int | None = Field(
        None, ge=1, description="Fail at most this many requests, then clear; null = no limit."
    )


class Faults:
    """The current fault plan and the random generator that decides who fails."""

    def __init__(self, rng: Random | None = None) -> None:
        self._rng = rng or Random(0)
        self.plan: FaultPlan | None = None
        self._remaining: int | None = None

    def set(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._remaining = plan.count

    def clear(self) -> None:
        self.plan = None
        self._remaining = None

    def should_fail(self) -> bool:
        """Decide for one request (consumes one draw when an error rate is set)."""
        plan = self.plan
        if plan is None or plan.error_rate <= 0 or self._rng.random() >= plan.error_rate:
            return False
        if self._remaining is not None:
            self._remaining -= 1
            if self._remaining <= 0:
                self.plan = plan.model_copy(update={"error_rate": 0.0, "count": None})
        return True


class RequestStats:
    """Read-API requests received, by collection and kind (``list`` or ``ids``)."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()

    def record(self, collection: str, kind: str) -> None:
        self._counts[(collection, kind)] += 1

    def count(self, collection: str | None = None, kind: str | None = None) -> int:
        return sum(
            n for (c, k), n in self._counts.items() if collection in (None, c) and kind in (None, k)
        )

    def as_dict(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (c, k), n in sorted(self._counts.items()):
            out.setdefault(c, {})[k] = n
        return out

    def reset(self) -> None:
        self._counts.clear()


class ChurnPlan(BaseModel):
    """The churn rate, as posted to ``/admin/v1/churn``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_second: float = Field(ge=0, description="Random mutations a second; 0 stops churn.")


class ChurnControl:
    """The churn rate the running churn task follows, and what delivery has sent.

    ``delivered`` returns the event cursor of each delivery (the sequence number
    of the last event it sent); :func:`server.serve` sets it.
    """

    def __init__(self, per_second: float = 0.0) -> None:
        self.per_second = per_second
        self.mutations = 0
        self.changed = asyncio.Event()
        self.delivered: Callable[[], list[int]] = list

    def set(self, per_second: float) -> None:
        self.per_second = per_second
        self.changed.set()


CLOUD = web.AppKey("cloud", Cloud)
CHURN = web.AppKey("churn", ChurnControl)
FAULTS = web.AppKey("faults", Faults)
STATS = web.AppKey("stats", RequestStats)
TOKEN = web.AppKey("token", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PlanT = TypeVar("PlanT", bound=BaseModel)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(payload).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": {"status": status, "message": message}}, status, headers)


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SimulatorError as exc:
        return _error(exc.status, str(exc))


@web.middleware
async def _read_api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/api/"):
        return await handler(request)
    app = request.app
    collection = request.match_info.get("collection", "")
    app[STATS].record(collection, "ids" if "ids" in request.query else "list")
    faults = app[FAULTS]
    plan = faults.plan
    if plan is not None and plan.latency_ms:
        await asyncio.sleep(plan.latency_ms / 1000)
    if plan is not None and faults.should_fail():
        headers = {}
        if plan.retry_after is not None and plan.status in (429, 503):
            headers["Retry-After"] = f"{plan.retry_after:g}"
        return _error(plan.status, "injected fault", headers)
    token = app[TOKEN]
    if token and request.headers.get("Authorization") != f"Bearer {token}":
        return _error(401, "missing or wrong bearer token")
    return await handler(request)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"{name} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise BadRequestError(f"{name} must be between {low} and {high}")
    return value


async def _list(request: web.Request) -> web.Response:
    cloud = request.app[CLOUD]
    collection = request.match_info["collection"]
    if "ids" in request.query:
        ids = [i for i in request.query["ids"].split(",") if i]
        return _json({"items": cloud.get_many(collection, ids), "next_page_token": None})
    limit = _int_param(request, "limit", 100, 1, MAX_PAGE_SIZE)
    items, token = cloud.list_page(
        collection, limit=limit, page_token=request.query.get("page_token") or None
    )
    return _json({"items": items, "next_page_token": token})


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequestError("body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequestError("body must be a JSON object")
    return body


async def _create(request: web.Request) -> web.Response:
    obj = request.app[CLOUD].create(request.match_info["collection"], await _body(request))
    return _json(obj, 201)


async def _update(request: web.Request) -> web.Response:
    m = request.match_info
    return _json(request.app[CLOUD].update(m["collection"], m["id"], await _body(request)))


async def _delete(request: web.Request) -> web.Response:
    m = request.match_info
    request.app[CLOUD].delete(m["collection"], m["id"])
    return web.Response(status=204)


async def _events(request: web.Request) -> web.Response:
    after = _int_param(request, "after", 0, 0, 2**62)
    limit = _int_param(request, "limit", 1000, 1, MAX_EVENTS_PER_READ)
    page = request.app[CLOUD].events_after(after, limit=limit)
    return _json(
        {
            "events": page.events,
            "last": page.last,
            "latest": page.latest,
            "truncated": page.truncated,
        }
    )


async def _plan(request: web.Request, model: type[PlanT], what: str) -> PlanT:
    """The request's body as ``model``; a 400 naming ``what`` when it is not one."""
    try:
        return model.model_validate(await _body(request))
    except PydanticValidationError as exc:
        raise BadRequestError(f"bad {what}: {exc.errors(include_url=False)}") from None


async def _set_faults(request: web.Request) -> web.Response:
    plan = await _plan(request, FaultPlan, "fault plan")
    request.app[FAULTS].set(plan)
    return _json(plan.model_dump())


async def _get_faults(request: web.Request) -> web.Response:
    plan = request.app[FAULTS].plan
    return _json(plan.model_dump() if plan else None)


async def _clear_faults(request: web.Request) -> web.Response:
    request.app[FAULTS].clear()
    return web.Response(status=204)


async def _get_stats(request: web.Request) -> web.Response:
    return _json({"requests": request.app[STATS].as_dict()})


async def _reset_stats(request: web.Request) -> web.Response:
    request.app[STATS].reset()
    return web.Response(status=204)


def _churn_state(request: web.Request) -> dict[str, Any]:
    control, cloud = request.app[CHURN], request.app[CLOUD]
    return {
        "per_second": control.per_second,
        "mutations": control.mutations,
        "last_sequence": cloud.last_sequence,
        "delivered": control.delivered(),
    }


async def _get_churn(request: web.Request) -> web.Response:
    return _json(_churn_state(request))


async def _set_churn(request: web.Request) -> web.Response:
    plan = await _plan(request, ChurnPlan, "churn plan")
    request.app[CHURN].set(plan.per_second)
    return _json(_churn_state(request))


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "ok", "name": request.app[CLOUD].name})


_ROUTES: dict[str, dict[str, Handler]] = {
    "/healthz": {"GET": _health},
    "/api/v1/{collection}": {"GET": _list},
    "/admin/v1/events": {"GET": _events},
    "/admin/v1/faults": {"POST": _set_faults, "GET": _get_faults, "DELETE": _clear_faults},
    "/admin/v1/stats": {"GET": _get_stats, "DELETE": _reset_stats},
    "/admin/v1/churn": {"GET": _get_churn, "POST": _set_churn},
    "/admin/v1/{collection}": {"POST": _create},
    "/admin/v1/{collection}/{id}": {"PATCH": _update, "DELETE": _delete},
}
"""Handlers by path and method, in the order the router tries the paths (GET also serves HEAD)."""


def create_app(
    cloud: Cloud, *, token: str | None = None, fault_rng: Random | None = None
) -> web.Application:
    """The simulator app serving ``cloud``; ``token`` makes the read API need a bearer token."""
    app = web.Application(middlewares=[_errors_middleware, _read_api_middleware])
    app[CLOUD] = cloud
    app[FAULTS] = Faults(fault_rng)
    app[STATS] = RequestStats()
    app[CHURN] = ChurnControl()
    app[TOKEN] = token or ""
    app.add_routes(
        web.route(method, path, handler)
        for path, handlers in _ROUTES.items()
        for method, handler in handlers.items()
    )
    return app
