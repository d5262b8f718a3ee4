"""What a benchmark's engine sends to the database: seconds and calls per SQL statement
kind, queries per refresh, and (diagnosis only) auto_explain plans of slow statements.

Flow: persister -> engine (**SQLAlchemy / driver events**) -> database.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any


class StatementTimer:
    """Seconds per SQL statement kind (SQLAlchemy cursor events + the stager's COPY)."""

    _active: StatementTimer | None = None
    _load_wrapped = False

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.enabled = False

    def attach(self, engine: Any) -> None:
        from sqlalchemy import event

        sync = engine.sync_engine

        @event.listens_for(sync, "before_cursor_execute")
        def _before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            conn.info.setdefault("_bench_t0", []).append(time.perf_counter())

        @event.listens_for(sync, "after_cursor_execute")
        def _after(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            t0 = conn.info["_bench_t0"].pop()
            if self.enabled:
                key = statement_kind(statement)
                self.seconds[key] += time.perf_counter() - t0
                self.calls[key] += 1

        @event.listens_for(sync, "handle_error")
        def _error(ctx):  # type: ignore[no-untyped-def]
            conn = ctx.connection
            stack = conn.info.get("_bench_t0") if conn is not None else None
            if stack:
                stack.pop()

        StatementTimer._active = self
        if StatementTimer._load_wrapped:
            return
        StatementTimer._load_wrapped = True
        from daemon.persistence import staging

        original = staging.Stager.load

        async def load(stager: Any, st: Any, rows: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await original(stager, st, rows)
            finally:
                timer = StatementTimer._active
                if timer is not None and timer.enabled:
                    key = f"stage load (COPY/executemany) {st.stage.name}"
                    timer.seconds[key] += time.perf_counter() - t0
                    timer.calls[key] += 1

        staging.Stager.load = load  # type: ignore[method-assign]

    def activate(self) -> None:
        """Make this the timer the class-wide stage-load wrapper reports to."""
        StatementTimer._active = self

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    @contextlib.contextmanager
    def recording(self) -> Iterator[StatementTimer]:
        self.reset()
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False

    def report(self, total: float, *, top: int = 20, indent: str = "    ") -> list[str]:
        lines = []
        for key, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(
                f"{indent}{s:8.3f} s {100 * s / total:5.1f}%  {self.calls[key]:6d} calls  {key}"
            )
        return lines


def statement_kind(sql: str) -> str:
    """A short label: verb + target table + distinguishing clause."""
    s = " ".join(sql.split())
    up = s.upper()
    words = s.split(" ")
    if up.startswith(("INSERT INTO STAGE_", "DELETE FROM STAGE_", "DELETE FROM SEEN_")):
        return f"{' '.join(words[:3])} (sqlite staging; inside stage load or prepare)"
    if up.startswith("INSERT INTO"):
        table = words[2]
        if table.startswith("seen_"):
            return f"mark_seen -> {table}"
        if "DO NOTHING RETURNING ID" in up and "SELECT DISTINCT" in up:
            src = "stage_" + s.split(" FROM stage_", 1)[1].split(" ", 1)[0]
            return f"skeletal {table} <- {src}"
        if up.startswith("INSERT INTO REFRESH_RUNS"):
            return "insert refresh_runs"
        return f"upsert {table}"
    if up.startswith("WITH SRC AS ("):  # daemon.persistence.diff_statements, PostgreSQL
        table = s.split(" ins AS (INSERT INTO ", 1)[1].split(" ", 1)[0]
        return f"diff save {table}" + (" +seen" if " marked AS (" in s else "")
    if up.startswith("UPDATE") and " FROM (SELECT " in up and "RETURNING" in up:
        return f"diff update {words[1]}"  # daemon.persistence.diff_statements, SQLite
    if up.startswith("SELECT COUNT(*) FROM STAGE_"):
        return f"count_new {words[3]}"
    if up.startswith("SELECT COUNT(*) FROM"):
        kind = "count_full" if "NOT EXISTS" in up else "count_active"
        return f"{kind} {words[3]}"
    if up.startswith("UPDATE") and "ARCHIVED_AT = " in up and "IN (SELECT T.ID" in up:
        return f"sweep(archive) {words[1]}" + (" targeted" if "EMS_REF IN" in up else "")
    if up.startswith("DELETE FROM"):
        return f"sweep(delete) {words[2]}" + (" targeted" if "EMS_REF IN" in up else "")
    if up.startswith("TRUNCATE") or up.startswith("CREATE") or up.startswith("DELETE"):
        return " ".join(words[:3])
    if "PG_ADVISORY_XACT_LOCK" in up:
        return "advisory lock"
    return " ".join(words[:4])[:60]


def enable_auto_explain(engine: Any, min_ms: int, sink: list[str]) -> None:
    """Plans (EXPLAIN ANALYZE) of statements slower than ``min_ms``, via auto_explain.

    The server sends them as LOG notices (``client_min_messages = log``); they are
    appended to ``sink``.  Timing overhead is real: use for diagnosis only.
    """
    from sqlalchemy import event

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cur = dbapi_connection.cursor()
        for sql in (
            "LOAD 'auto_explain'",
            f"SET auto_explain.log_min_duration = {int(min_ms)}",
            "SET auto_explain.log_analyze = on",
            "SET auto_explain.log_timing = off",
            "SET client_min_messages = log",
        ):
            cur.execute(sql)
        cur.close()
        driver = dbapi_connection.driver_connection

        def listener(_conn: Any, message: Any) -> None:
            text = getattr(message, "message", str(message))
            if "duration:" in text:
                sink.append(text)

        driver.add_log_listener(listener)

    event.listen(engine.sync_engine, "connect", on_connect)


class QueryCounter:
    """Queries sent to the database by this process's engine connections.

    PostgreSQL: asyncpg's query logger (each query is at least one round trip; a
    multi-statement simple query is one).  SQLite: the sqlite3 trace callback
    (statements run; each is one hop to aiosqlite's thread or fewer).
    """

    def __init__(self) -> None:
        self.count = 0

    def _hit(self, *_: Any) -> None:
        self.count += 1

    def attach(self, engine: Any, backend: str) -> None:
        from sqlalchemy import event
        from sqlalchemy.util import await_

        @event.listens_for(engine.sync_engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            driver = dbapi_connection.driver_connection
            if backend == "postgresql":
                driver.add_query_logger(self._hit)
            else:
                await_(driver.set_trace_callback(self._hit))
