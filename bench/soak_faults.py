"""The faults bench/soak.py injects, one at a time with a quiet gap between them, drawn
from a seeded ``random.Random``: what each does, how long it lasts, how fast refreshd
recovered, and a daemon that exited by itself (a bug: recorded and restarted).

Flow: **soak_faults** -> the soak's children (daemon, broker, database, simulator API).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

from simulator import http_json
from soak_children import SoakChildren, eventually

KINDS = ("kill9", "broker_pause", "db_pause", "http429", "http500")
DURATIONS = {  # seconds a fault lasts (kill9: time the daemon stays down)
    "kill9": (0.0, 5.0),
    "broker_pause": (5.0, 25.0),
    "db_pause": (5.0, 30.0),
    "http429": (5.0, 20.0),
    "http500": (5.0, 20.0),
}


@dataclass
class Fault:
    kind: str
    at: float
    """Seconds since churn started."""
    duration: float
    recovered_after: float | None = None
    """Seconds from the end of the fault until /readyz and /healthz were 200 (None: never)."""
    note: str = ""


class Faults:
    """The faults injected into ``children`` during one soak run, in order."""

    def __init__(self, args: argparse.Namespace, children: SoakChildren) -> None:
        self.args = args
        self.children = children
        self.rng = random.Random(args.seed)
        self.injected: list[Fault] = []
        self.t0 = 0.0
        """When churn started (time.monotonic())."""

    async def inject(self, kind: str) -> Fault:
        c = self.children
        assert c.daemon is not None and c.broker is not None and c.pg is not None
        low, high = DURATIONS[kind]
        duration = round(self.rng.uniform(low, high), 1)
        fault = Fault(kind, time.monotonic() - self.t0, duration)
        print(f"  {fault.at:7.0f}s  {kind:<13} {duration:5.1f}s ...", flush=True)
        if kind == "kill9":
            c.daemon.kill()
            await asyncio.sleep(duration)
            c.daemon.start()
        elif kind == "broker_pause":
            c.broker.pause()
            try:
                await asyncio.sleep(duration)
            finally:
                c.broker.resume()
        elif kind == "db_pause":
            await asyncio.to_thread(c.pg.stop)
            try:
                await asyncio.sleep(duration)
            finally:
                await asyncio.to_thread(c.pg.start)
        else:
            status = 429 if kind == "http429" else 500
            plan: dict[str, Any] = {"error_rate": 0.5, "status": status}
            if status == 429:
                plan["retry_after"] = 1
            await http_json("POST", c.sim_url + "/admin/v1/faults", plan)
            try:
                await asyncio.sleep(duration)
            finally:
                await http_json("DELETE", c.sim_url + "/admin/v1/faults")
        ended = time.monotonic()
        if await eventually(c.healthy, self.args.recover_timeout):
            fault.recovered_after = time.monotonic() - ended
        return fault

    async def check_alive(self) -> None:
        """A daemon that exited without being killed is a bug: record it and restart."""
        daemon = self.children.daemon
        assert daemon is not None and daemon.proc is not None
        if not daemon.alive():
            code = daemon.proc.returncode
            self.injected.append(
                Fault("daemon_exit", time.monotonic() - self.t0, 0.0, note=f"exit {code}!")
            )
            print(f"  daemon exited by itself with status {code}; restarting", flush=True)
            daemon.start()
            await eventually(self.children.ready, self.args.recover_timeout, 0.2)

    async def run(self) -> None:
        """Faults until --duration after ``t0`` (each one ends in time), then the rest quiet."""
        args = self.args
        kinds = [k for k in args.faults.split(",") if k]
        end = self.t0 + args.duration
        while len([f for f in self.injected if f.kind in KINDS]) < args.max_faults:
            gap = self.rng.uniform(args.gap / 2, args.gap * 1.5)
            kind = self.rng.choice(kinds)
            if time.monotonic() + gap + DURATIONS[kind][1] > end:
                break
            await asyncio.sleep(gap)
            await self.check_alive()
            self.injected.append(await self.inject(kind))
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        await self.check_alive()

    def print_report(self) -> None:
        print(f"\nfaults injected ({len(self.injected)}):")
        print(f"  {'kind':<13} {'at (s)':>7} {'duration (s)':>12} {'recovered (s)':>14}  note")
        for f in self.injected:
            rec = "never" if f.recovered_after is None else f"{f.recovered_after:.1f}"
            print(f"  {f.kind:<13} {f.at:7.0f} {f.duration:12.1f} {rec:>14}  {f.note}")
        by_kind = {k: sum(1 for f in self.injected if f.kind == k) for k in KINDS}
        print("  by kind: " + ", ".join(f"{k} {n}" for k, n in by_kind.items()))

    def print_anomalies(self) -> None:
        exits = [f for f in self.injected if f.kind == "daemon_exit"]
        stuck = [f for f in self.injected if f.kind in KINDS and f.recovered_after is None]
        if exits or stuck:  # not losses, but bugs worth a look in the daemon's log
            print(
                f"anomalies: the daemon exited by itself {len(exits)} time(s); "
                f"{len(stuck)} fault(s) not recovered from within {self.args.recover_timeout:.0f}s"
            )
