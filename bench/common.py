"""Shared by the refresh benchmarks: simulator subprocess, RSS sampling, timing helpers.

Nothing here asserts on time: the benchmarks print figures (see bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
VENV_BIN = ROOT / ".venv" / "bin"
REFRESHD = VENV_BIN / "refreshd"

MANAGER = "bench"
PROVIDER = "awesome_cloud"


# -- machine ----------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    vm = psutil.virtual_memory()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": f"{vm.total / 2**30:.1f} GiB total, {vm.available / 2**30:.1f} GiB available",
        "python": platform.python_version(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


async def pg_version(dsn: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        v = await conn.fetchval("SHOW server_version")
        sb = await conn.fetchval("SHOW shared_buffers")
        sc = await conn.fetchval("SHOW synchronous_commit")
        return f"{v} (shared_buffers={sb}, synchronous_commit={sc})"
    finally:
        await conn.close()


def print_machine(info: dict[str, str]) -> None:
    print("machine:")
    for k, v in info.items():
        print(f"  {k:<11} {v}")


# -- simulator in a separate process ------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SimulatorProcess:
    url: str
    proc: asyncio.subprocess.Process
    ready_seconds: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        try:
            return psutil.Process(self.proc.pid).memory_info().rss
        except psutil.Error:
            return 0


@contextlib.asynccontextmanager
async def simulator_process(
    vms: int, *, seed: int = 1, timeout: float = 300.0
) -> AsyncIterator[SimulatorProcess]:
    """``refreshd simulator --port P --vms N --seed S`` in its own process, until exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(f"/tmp/refreshd-bench-simulator-{port}.log", "wb")  # noqa: SIM115
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        str(REFRESHD),
        "simulator",
        "--port",
        str(port),
        "--vms",
        str(vms),
        "--seed",
        str(seed),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(ROOT),
    )
    failed = True
    try:
        async with aiohttp.ClientSession() as http:
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"simulator exited with {proc.returncode}; see {log.name}")
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"simulator not ready after {timeout}s; see {log.name}")
                try:
                    async with http.get(f"{url}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        yield SimulatorProcess(url, proc, time.perf_counter() - t0)
        failed = False
    finally:
        if proc.returncode is None:
            proc.terminate()  # our own child, by pid
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
        if not failed:
            Path(log.name).unlink(missing_ok=True)  # kept only to diagnose a failure


async def patch_vms(
    url: str, changes: dict[str, dict[str, Any]], *, concurrency: int = 16
) -> float:
    """PATCH /admin/v1/vms/{id} for each (id -> fields); returns the seconds it took."""
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as http:

        async def one(vm_id: str, fields: dict[str, Any]) -> None:
            async with sem, http.patch(f"{url}/admin/v1/vms/{vm_id}", json=fields) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"PATCH {vm_id}: {resp.status} {await resp.text()}")

        await asyncio.gather(*(one(i, f) for i, f in changes.items()))
    return time.perf_counter() - t0


# -- memory -------------------------------------------------------------------------------


def ru_maxrss_bytes() -> int:
    """Lifetime peak RSS of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Peak RSS of this process, sampled every ``interval`` seconds by a task."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._proc = psutil.Process()
        self.peak = 0
        self.start_rss = 0
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        if rss > self.peak:
            self.peak = rss

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> RssSampler:
        self.start_rss = self._proc.memory_info().rss
        self.peak = self.start_rss
        self._task = asyncio.create_task(self._run(), name="rss-sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._sample()
        self._task.cancel()
        await asyncio.wait([self._task])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


# -- timing helpers -------------------------------------------------------------------------


def percentile(values: list[float], p: int) -> float:
    """The p-th percentile (1..99), linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


@dataclass
class PageTiming:
    """What a save's page stream cost the consumer (the persister)."""

    pages: int = 0
    rows: int = 0
    rows_by_collection: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wait: float = 0.0
    """Seconds the persister waited for the next page (collect not hidden by prefetch)."""


async def timed_pages(
    pages: AsyncIterable[Any], timing: PageTiming, *, count_wait: bool = True
) -> AsyncIterator[Any]:
    it = aiter(pages)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                page = await anext(it)
            except StopAsyncIteration:
                if count_wait:
                    timing.wait += time.perf_counter() - t0
                return
            if count_wait:
                timing.wait += time.perf_counter() - t0
            timing.pages += 1
            for name, rows in page.rows.items():
                timing.rows += len(rows)
                timing.rows_by_collection[name] += len(rows)
            yield page
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


def instrument_persister(persister: Any) -> Callable[[], PageTiming]:
    """Wrap ``persister.save`` so each call's page stream is timed; returns a getter
    of the last call's :class:`PageTiming`."""
    original = persister.save
    last: list[PageTiming] = [PageTiming()]
    # a persister that merges pages into save batches (daemon/pipeline/page_batches.py) reads
    # pages in a task of its own: then its wait is for batches, timed around them
    from daemon.persistence import saver as saver_module

    batches = getattr(saver_module, "coalesced", None)
    if batches is not None and not getattr(batches, "_bench_timed", False):

        def coalesced(pages: AsyncIterable[Any], **kw: Any) -> AsyncIterator[Any]:
            return _timed_batches(batches(pages, **kw), last[0])

        coalesced._bench_timed = True  # type: ignore[attr-defined]
        saver_module.coalesced = coalesced  # type: ignore[attr-defined]

    async def save(manager: str, pages: AsyncIterable[Any], **kw: Any) -> Any:
        timing = PageTiming()
        last[0] = timing
        return await original(manager, timed_pages(pages, timing, count_wait=batches is None), **kw)

    persister.save = save
    return lambda: last[0]


async def _timed_batches(batches: Any, timing: PageTiming) -> AsyncIterator[Any]:
    """The persister's wait for each save batch (its pages are counted by timed_pages)."""
    try:
        while True:
            t0 = time.perf_counter()
            try:
                batch = await anext(batches)
            except StopAsyncIteration:
                timing.wait += time.perf_counter() - t0
                return
            timing.wait += time.perf_counter() - t0
            yield batch
    finally:
        await batches.aclose()


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


class BackendCpu:
    """CPU seconds of the PostgreSQL backends serving this engine's connections only
    (other sessions on a shared server are not counted)."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def attach(self, engine: Any) -> None:
        from sqlalchemy import event

        def on_connect(dbapi_connection: Any, _record: Any) -> None:
            cur = dbapi_connection.cursor()
            cur.execute("SELECT pg_backend_pid()")
            self.pids.add(int(cur.fetchone()[0]))
            cur.close()

        event.listen(engine.sync_engine, "connect", on_connect)

    def seconds(self) -> float:
        total = 0.0
        for pid in list(self.pids):
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                self.pids.discard(pid)
        return total


def process_cpu(pid: int | None = None) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


class PhaseTimer:
    """Wall seconds per persister phase, by wrapping its methods (bench-side only).

    Phases: begin (pool checkout + pre-ping + BEGIN), lock, prepare (temp tables),
    pages (stage + statements), sweep, record, commit.  Missing methods are skipped,
    so a refactored persister still runs (with fewer phases reported).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = False

    _active: PhaseTimer | None = None
    _wrapped = False

    @staticmethod
    def _wrap(owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                timer = PhaseTimer._active
                if timer is not None and timer.enabled:
                    timer.seconds[phase] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    def attach(self) -> None:
        """Make this the timer the (class-wide, once-installed) wrappers report to."""
        PhaseTimer._active = self
        if PhaseTimer._wrapped:
            return
        PhaseTimer._wrapped = True
        from daemon.persistence import dialect, persister, saver, staging, sweeper

        W = dialect.WriteTransaction
        self._wrap(W, "__aenter__", "begin")
        self._wrap(W, "__aexit__", "commit")
        self._wrap(saver, "lock_manager", "advisory lock")  # as the saver calls it
        self._wrap(staging.Stager, "prepare", "temp tables prepare")
        self._wrap(sweeper.Sweeper, "count_active", "count_active")
        self._wrap(saver.StagedSaver, "_save_page", "pages")
        self._wrap(sweeper.Sweeper, "sweep_full", "sweep")
        self._wrap(sweeper.Sweeper, "sweep_targeted", "sweep")
        self._wrap(saver, "record_run", "record run")
        self._wrap(persister.Persister, "resolve_targets", "resolve targets")

    def activate(self) -> None:
        PhaseTimer._active = self

    @contextlib.contextmanager
    def recording(self) -> Iterator[PhaseTimer]:
        self.seconds.clear()
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False


def code_fingerprint() -> str:
    """Commit + a hash of the uncommitted diff of daemon/ and providers/ (the code measured)."""
    import hashlib

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "daemon", "providers"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout
    except OSError:
        return "?"
    digest = hashlib.sha1(diff.encode()).hexdigest()[:10] if diff else "clean"
    return f"{head}+diff:{digest}"
