"""Soak: churn plus random faults under `refreshd run`; the database must end equal to the cloud.

Flow: soak_children (simulator -> broker -> `refreshd run` -> PostgreSQL) + soak_faults -> report.

    simulator (own process: churn, Kafka delivery) -> Tansu broker (own) -> `refreshd run`
    -> PostgreSQL (a private cluster made with initdb/pg_ctl in a temp dir, on a free port;
    the shared server on 5432 is never touched)

After the daemon's start-up full refresh the cloud changes itself --rate times a
second and delivers every event to Kafka.  Meanwhile faults, drawn from a seeded
``random.Random``, are injected one at a time, with a quiet gap between them,
bounded in number (--max-faults) and duration:

* ``kill9``: SIGKILL the daemon, restart it after 0-5 s;
* ``broker_pause``: SIGSTOP the Tansu process for 5-25 s, then SIGCONT;
* ``db_pause``: ``pg_ctl stop -m immediate`` of the private cluster, start again after 5-30 s;
* ``http429`` / ``http500``: the simulator's read API answers 429 (Retry-After 1) or 500
  to half of its requests for 5-20 s (``/admin/v1/faults``).

After each fault the soak waits (bounded, --recover-timeout) until ``/readyz`` and
``/healthz`` answer 200 again and reports how long that took.  A daemon that exits
by itself is recorded (it is a bug) and restarted.

At --duration the churn is stopped (``POST /admin/v1/churn``), faults cleared, and
the soak waits (bounded, --drain-timeout) until the simulator has delivered every
event, the consumer group has committed the topic's end and the database equals the
cloud (read through the simulator's API; ``tests.cloud_state`` compares).  Nothing
is forced: no manual full refresh.  It prints the faults (kind, at, duration,
recovery), events produced / in the topic / committed, refresh_runs by kind and
outcome, and the differences; exit status 0 only when there are none and every
record was committed.  SIGTERM / Ctrl-C stop every child (bounded) and exit 2.

    .venv/bin/python bench/soak.py --duration 1800
    .venv/bin/python bench/soak.py --duration 300 --rate 30 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from kafka_topics import committed, topic_end  # noqa: E402
from machine import load_average  # noqa: E402
from processes import cancel_on_signals  # noqa: E402
from simulator import ApiCloud, http_json  # noqa: E402
from soak_children import GROUP, MANAGER, TOPIC, SoakChildren, eventually  # noqa: E402
from soak_faults import KINDS, Faults  # noqa: E402

from daemon.persistence import schema  # noqa: E402
from daemon.persistence.db import create_engine  # noqa: E402
from tests.cloud_state import (  # noqa: E402
    cloud_state,
    database_state,
    diff_states,
    skeletal_refs,
)


class Soak:
    """One soak run: its children and the faults injected into them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="refreshd-soak-"))
        self.children = SoakChildren(args, self.work)
        self.faults = Faults(args, self.children)

    def stop_all(self) -> None:
        self.children.stop_all()

    async def run(self) -> int:
        args = self.args
        children = self.children
        await children.start()
        assert children.daemon is not None and children.broker is not None
        assert children.pg is not None
        sim_url = children.sim_url
        engine = create_engine(children.pg.url)  # to read what the daemon wrote
        try:

            async def full_refreshed() -> bool:
                async with engine.connect() as conn:
                    r = schema.refresh_runs
                    query = select(func.count()).where(r.c.kind == "full", r.c.error.is_(None))
                    return bool((await conn.execute(query)).scalar_one())

            if not await eventually(full_refreshed, 300):
                raise RuntimeError("no start-up full refresh within 300 s")
            _, state = await http_json(
                "POST", sim_url + "/admin/v1/churn", {"per_second": args.rate}
            )
            seq0 = state["last_sequence"]
            self.faults.t0 = time.monotonic()
            print(
                f"soak: {args.vms} vms, churn {args.rate:g}/s, {args.duration:.0f}s, seed "
                f"{args.seed}, faults {args.faults}; load average {load_average()}; "
                f"logs in {self.work}",
                flush=True,
            )
            await self.faults.run()

            _, state = await http_json("POST", sim_url + "/admin/v1/churn", {"per_second": 0})
            await http_json("DELETE", sim_url + "/admin/v1/faults")
            churned = time.monotonic() - self.faults.t0
            produced = state["last_sequence"] - seq0
            print(f"churn stopped after {churned:.0f}s; load average {load_average()}", flush=True)
            drain_start = time.monotonic()
            deadline = drain_start + args.drain_timeout

            async def delivered() -> bool:
                _, s = await http_json("GET", sim_url + "/admin/v1/churn")
                return all(c >= s["last_sequence"] for c in s["delivered"])

            all_delivered = await eventually(delivered, deadline - time.monotonic())
            cloud = await ApiCloud.read(sim_url)
            expected = cloud_state(cloud)
            bootstrap = children.broker.bootstrap
            end = await topic_end(bootstrap, TOPIC)
            offsets = {"committed": 0}
            lines: list[str] = []
            tolerated = {"n": 0}

            async def converged() -> bool:
                offsets["committed"] = await committed(bootstrap, TOPIC, GROUP)
                stored = await database_state(engine, MANAGER)
                tolerated["n"] = 0
                for collection, refs in skeletal_refs(stored).items():
                    for ref in refs - expected[collection].keys():
                        del stored[collection][ref]  # a reference to what the cloud deleted
                        tolerated["n"] += 1
                lines[:] = diff_states(stored, expected)
                return offsets["committed"] >= end and not lines

            await self.faults.check_alive()
            equal = await eventually(converged, max(0.0, deadline - time.monotonic()), 2.0)
            drained = time.monotonic() - drain_start
            async with engine.connect() as conn:
                r = schema.refresh_runs
                runs = (
                    await conn.execute(
                        select(r.c.kind, r.c.error.is_(None), func.count())
                        .group_by(r.c.kind, r.c.error.is_(None))
                        .order_by(r.c.kind)
                    )
                ).all()
        finally:
            await engine.dispose()

        self.faults.print_report()
        print("\nevents:")
        print(f"  produced by the cloud      {produced:8d} ({produced / churned:.1f}/s)")
        print(f"  delivered to the topic     {'all' if all_delivered else 'NOT all':>8}")
        print(f"  records in the topic       {end:8d}")
        print(f"  committed by the daemon    {offsets['committed']:8d}")
        print(f"  lost (not committed)       {max(0, end - offsets['committed']):8d}")
        print(
            "refresh_runs: " + ", ".join(f"{k} {'ok' if ok else 'failed'} {n}" for k, ok, n in runs)
        )
        rows = sum(len(v) for v in expected.values())
        print(
            f"\ndatabase vs cloud ({rows} cloud rows; {tolerated['n']} skeletal rows for "
            f"deleted references tolerated): "
            + ("EQUAL" if equal else f"{len(lines)} DIFFERENCE LINES")
            + f", {drained:.0f}s after churn stopped; load average {load_average()}"
        )
        for line in lines[:60]:
            print("  " + line)
        self.faults.print_anomalies()
        return 0 if equal else 1


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=1800, help="seconds of churn and faults")
    ap.add_argument("--vms", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=30, help="cloud changes per second")
    ap.add_argument("--seed", type=int, default=1, help="seed of the faults and the cloud")
    ap.add_argument("--faults", default=",".join(KINDS), help="comma-separated kinds")
    ap.add_argument("--gap", type=float, default=30, help="mean quiet seconds between faults")
    ap.add_argument("--max-faults", type=int, default=200)
    ap.add_argument("--recover-timeout", type=float, default=120)
    ap.add_argument("--drain-timeout", type=float, default=300)
    args = ap.parse_args()
    unknown = set(args.faults.split(",")) - set(KINDS) - {""}
    if unknown:
        ap.error(f"unknown fault kinds {sorted(unknown)}; choose from {KINDS}")
    cancel_on_signals()
    soak = Soak(args)
    try:
        return await soak.run()
    except asyncio.CancelledError:
        print(f"interrupted; stopping children (logs in {soak.work})", file=sys.stderr)
        return 2
    finally:
        await asyncio.to_thread(soak.stop_all)
        print(f"logs in {soak.work}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(asyncio.run(main()))
