"""The status page, ``GET /``: what an operator checks first, as server-rendered HTML.

Flow: operator's browser -> http -> **status page** -> (managers table, batcher,
progress board, catcher stats, ``refresh_runs``).

One page, no JavaScript and no build step; it reloads itself every 5 seconds.
It shows: readiness (as ``/readyz`` reports it); per manager its freshness (age
of the last full and of the last refresh, stale past two intervals), last error,
pending targets and the refresh in flight with its progress; per catcher its
state, lag and counters; the most recent ``refresh_runs``.  Everything shown is
also available as JSON (``/managers``) or metrics (``/metrics``).  Read-only and
unauthenticated, like ``/managers``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from sqlalchemy import select

from daemon.persistence import schema
from daemon.service.http import HttpDeps
from daemon.service.scrape_collectors import split_stream
from daemon.service.version import refreshd_version

RECENT_RUNS = 25
RELOAD_SECONDS = 5

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:60%}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eee} td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#17692b;font-weight:600} .bad{color:#b00020;font-weight:600}
.stale{background:#fff1f0} .muted{color:#777} .error{color:#b00020;max-width:40em}
nav a{margin-right:1em}
"""


def add_status_page(
    app: web.Application, deps: HttpDeps, *, intervals: Mapping[str, float]
) -> None:
    """Serve the status page at ``/`` of the daemon's app."""

    async def status(_request: web.Request) -> web.Response:
        body = render(await snapshot(deps, intervals=intervals))
        return web.Response(text=body, content_type="text/html", charset="utf-8")

    app.router.add_get("/", status)


async def snapshot(deps: HttpDeps, *, intervals: Mapping[str, float]) -> dict[str, Any]:
    """Everything the page shows, read now."""
    m, runs = schema.managers, schema.refresh_runs
    async with deps.engine.connect() as conn:
        rows = (await conn.execute(select(m))).mappings().all()
        recent = (
            (
                await conn.execute(
                    select(runs, m.c.name.label("manager"))
                    .join(m, m.c.id == runs.c.manager_id)
                    .order_by(runs.c.id.desc())
                    .limit(RECENT_RUNS)
                )
            )
            .mappings()
            .all()
        )
    by_name = {r["name"]: r for r in rows}
    managers = []
    now = deps.clock()
    for name in sorted(deps.managers):
        row = by_name.get(name)
        status = deps.batcher.manager_status(name)
        retry_at = status.next_retry_at
        managers.append(
            {
                "name": name,
                "provider": row["provider"] if row else "",
                "interval": intervals.get(name),
                "last_full": _utc(row["last_full_refresh_at"]) if row else None,
                "last": _utc(row["last_refresh_at"]) if row else None,
                "error": row["last_refresh_error"] if row else None,
                "error_at": _utc(row["last_refresh_error_at"]) if row else None,
                "pending": deps.batcher.pending_count(name),
                "in_flight": status.in_flight,
                "failures": status.consecutive_failures,
                "retry_in": max(retry_at - now, 0.0) if retry_at is not None else None,
                "progress": deps.progress.current(name),
            }
        )
    catchers = []
    for probe in deps.catchers:
        stats = probe.stats()
        catchers.append(
            {
                "name": probe.name,
                "up": probe.healthy(),
                "lag": {split_stream(k): v for k, v in stats.lag.items()},
                "received": stats.received,
                "decoded": stats.decoded,
                "skipped": stats.skipped,
                "dead_lettered": sum(stats.dead_lettered.values()),
            }
        )
    return {
        "now": datetime.now(UTC),
        "version": refreshd_version(),
        "not_ready": sorted(deps.readiness.reasons),
        "managers": managers,
        "catchers": catchers,
        "runs": [dict(r) for r in recent],
    }


def render(s: dict[str, Any]) -> str:
    now: datetime = s["now"]
    ready = (
        '<span class="ok" id="readiness">ready</span>'
        if not s["not_ready"]
        else f'<span class="bad" id="readiness">not ready: {_e(", ".join(s["not_ready"]))}</span>'
    )
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{RELOAD_SECONDS}">',
        f"<title>refreshd {_e(s['version'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>refreshd {_e(s['version'])}</h1>",
        f"<p>{ready} &middot; <span class=muted>as of {now:%Y-%m-%d %H:%M:%S} UTC,"
        f" reloads every {RELOAD_SECONDS}s</span></p>",
        '<nav><a href="/managers">/managers</a><a href="/metrics">/metrics</a>'
        '<a href="/healthz">/healthz</a><a href="/readyz">/readyz</a></nav>',
        "<h2>Managers</h2>",
        _managers_table(s["managers"], now),
        "<h2>Catchers</h2>",
        _catchers_table(s["catchers"]),
        f"<h2>Recent refreshes (last {RECENT_RUNS})</h2>",
        _runs_table(s["runs"], now),
        "</body></html>",
    ]
    return "\n".join(parts)


def _managers_table(managers: list[dict[str, Any]], now: datetime) -> str:
    head = (
        "<tr><th>manager</th><th>provider</th><th>last full refresh</th><th>last refresh</th>"
        "<th>last error</th><th>pending targets</th><th>refresh in flight</th></tr>"
    )
    rows = []
    for m in managers:
        stale = m["interval"] is not None and (
            m["last_full"] is None or (now - m["last_full"]).total_seconds() > 2 * m["interval"]
        )
        error = (
            f"<span class=error>{_e(m['error'])}</span><br><span class=muted>"
            f"{_ago(m['error_at'], now)}</span>"
            if m["error"]
            else '<span class="muted">none</span>'
        )
        rows.append(
            f'<tr data-manager="{_e(m["name"])}"{" class=stale" if stale else ""}>'
            f"<td>{_e(m['name'])}</td><td>{_e(m['provider'])}</td>"
            f'<td class="freshness">{_ago(m["last_full"], now)}{" (stale)" if stale else ""}</td>'
            f"<td>{_ago(m['last'], now)}</td><td>{error}</td>"
            f'<td class="num pending">{m["pending"]}</td>'
            f'<td class="progress">{_progress(m)}</td></tr>'
        )
    return f'<table id="managers">{head}{"".join(rows)}</table>'


def _progress(m: dict[str, Any]) -> str:
    p = m["progress"]
    if p is None and m["in_flight"]:
        return "refreshing"
    if p is None and m["retry_in"] is not None:
        return f"failed {m['failures']} time(s) in a row; retry in {m['retry_in']:.0f}s"
    if p is None:
        return '<span class="muted">idle</span>'
    rate = f", {p['rows_per_second']:.0f} rows/s" if p["rows_per_second"] else ""
    return (
        f"{_e(p['kind'])} ({_e(p['trigger'])}) for {p['seconds']:.0f}s: "
        f"{p['pages']} pages, {p['rows']} rows{rate}"
    )


def _catchers_table(catchers: list[dict[str, Any]]) -> str:
    if not catchers:
        return '<p class="muted" id="catchers">no catchers configured</p>'
    head = (
        "<tr><th>catcher</th><th>state</th><th>lag</th><th>received</th><th>decoded</th>"
        "<th>skipped</th><th>dead-lettered</th></tr>"
    )
    rows = []
    for c in catchers:
        state = '<span class="ok">up</span>' if c["up"] else '<span class="bad">down</span>'
        lag = "<br>".join(
            f"{_e(topic)}{'/' + _e(partition) if partition else ''}: {n}"
            for (topic, partition), n in sorted(c["lag"].items())
        )
        rows.append(
            f'<tr data-catcher="{_e(c["name"])}"><td>{_e(c["name"])}</td>'
            f'<td class="state">{state}</td><td class="lag">{lag or "-"}</td>'
            f'<td class="num">{c["received"]}</td><td class="num">{c["decoded"]}</td>'
            f'<td class="num">{c["skipped"]}</td><td class="num">{c["dead_lettered"]}</td></tr>'
        )
    return f'<table id="catchers">{head}{"".join(rows)}</table>'


def _runs_table(runs: list[dict[str, Any]], now: datetime) -> str:
    if not runs:
        return '<p class="muted" id="runs">no refresh yet</p>'
    head = (
        "<tr><th>started</th><th>manager</th><th>kind</th><th>trigger</th><th>targets</th>"
        "<th>created</th><th>updated</th><th>archived</th><th>deleted</th><th>duration</th>"
        "<th>error</th></tr>"
    )
    rows = []
    for r in runs:
        num = "".join(
            f'<td class="num">{r[k]}</td>'
            for k in ("targets", "created", "updated", "archived", "deleted")
        )
        rows.append(
            f"<tr><td>{_ago(_utc(r['started_at']), now)}</td><td>{_e(r['manager'])}</td>"
            f"<td>{_e(r['kind'])}</td><td class=trigger>{_e(r.get('trigger') or '-')}</td>{num}"
            f'<td class="num">{r["duration"]:.3f}s</td>'
            f"<td class=error>{_e(r['error'] or '')}</td></tr>"
        )
    return f'<table id="runs">{head}{"".join(rows)}</table>'


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return '<span class="muted">never</span>'
    seconds = max((now - when).total_seconds(), 0.0)
    if seconds < 120:
        text = f"{seconds:.0f}s ago"
    elif seconds < 7200:
        text = f"{seconds / 60:.0f}m ago"
    elif seconds < 172800:
        text = f"{seconds / 3600:.1f}h ago"
    else:
        text = f"{seconds / 86400:.1f}d ago"
    return f'<time datetime="{when.isoformat()}">{text}</time>'


def _e(value: object) -> str:
    return html.escape(str(value))
