"""Targeted refresh latency: 1 vm and 100 vms, with 1k and 100k vms in the database.

Flow: targeted_cases (inventories, one_refresh) -> samples -> stats -> printed summary.

Real Refresher + Persister + AwesomeConnection with the simulator embedded in this
process (``endpoint = "embedded"``).  Before each refresh the targeted vms are
changed in the cloud (new tags, state flipped), so every refresh writes rows.

The machine is shared and noisy, so for each backend both inventories are set up
side by side (one database and one embedded cloud each) and their refreshes are
*interleaved* (1k, 100k, 100k, 1k, ...): both sizes see the same noise, and the
ratio 100k/1k is meaningful even when absolute figures drift.

Three ways of saving are interleaved per inventory, each on fresh random vms:

* ``default``: the daemon as configured (targeted batches of at most
  ``PersisterSettings.small_batch_max_targets`` take the small-batch path);
* ``staged``: the daemon with every refresh forced through the staged path
  (temp tables + COPY), the path before the small-batch one existed;
* ``raw``: the floor, a hand-written transaction doing the same writes for the
  same kind of vms (bench/raw_targeted.py), persist only (no collect).

Prints p50/p99 per case, the split collect (HTTP + parse) vs persist, queries
(PostgreSQL: asyncpg queries, each at least one round trip; SQLite: statements
run) per refresh, the ratios to the raw floor and the ratio 100k/1k.

    .venv/bin/python bench/targeted_refresh.py                 # PostgreSQL and SQLite
    .venv/bin/python bench/targeted_refresh.py --backends postgresql --inventories 1000,10000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import code_fingerprint, load_average, machine_info, print_machine
from stats import ms
from targeted_cases import Samples, one_refresh, open_inventory, summarize
from wiring import MANAGER

WARMUP = 5
PATHS = ("default", "staged", "raw")


async def run_backend(
    backend: str, sizes: list[int], cases: list[tuple[int, int]], seed: int
) -> list[dict[str, Any]]:
    async with contextlib.AsyncExitStack() as stack:
        invs = [await open_inventory(stack, backend, vms, seed) for vms in sizes]
        out = [{"backend": backend, "vms": inv.vms, **inv.info, "cases": []} for inv in invs]
        for batch, iterations in cases:
            gc.collect()
            samples = [{p: Samples() for p in PATHS} for _ in invs]
            for i in range(WARMUP + iterations):
                order = [(k, p) for k in range(len(invs)) for p in PATHS]
                if i % 2:
                    order.reverse()
                for k, path in order:
                    measuring = i >= WARMUP
                    await one_refresh(
                        invs[k],
                        batch,
                        path,
                        samples[k][path] if measuring else None,
                        last=i == WARMUP + iterations - 1,
                    )
            for inv, per_path, o in zip(invs, samples, out, strict=True):
                raw = summarize(batch, iterations, per_path["raw"], "raw")
                for path in PATHS:
                    r = summarize(batch, iterations, per_path[path], path)
                    o["cases"].append(r)
                    print(
                        f"  {backend:<10} {inv.vms:>7,d} vms {batch:3d} vm(s) x {iterations} "
                        f"{path:<7}: p50 {ms(r['p50'])} ms  p99 {ms(r['p99'])} ms | collect "
                        f"{ms(r['collect_p50'])}  persist {ms(r['persist_p50'])} | "
                        f"{r['queries_median']:.0f} queries | p50/raw "
                        f"{r['p50'] / raw['p50']:.2f}, persist/raw "
                        f"{r['persist_p50'] / raw['p50']:.2f} | written "
                        f"{r['rows_written_median']:.0f}"
                    )
                    if path == "staged":
                        print(
                            "        staged persister phases, mean per refresh (ms): "
                            + "  ".join(
                                f"{k} {1000 * v:.2f}"
                                for k, v in sorted(r["phases_mean"].items(), key=lambda kv: -kv[1])
                            )
                        )
        for inv, o in zip(invs, out, strict=True):
            after = await inv.persister.row_counts(MANAGER)
            before = o["row_counts_before"]
            o["row_counts_after"] = after
            expected = {c: inv.cloud.count(c) for c in ("vms", "flavors", "images")}
            lost = {k: (before[k], after[k]) for k in before if after[k] < before[k]}
            if lost or any(after[k] != v for k, v in expected.items()):
                print(
                    f"  WARNING [{backend}, {inv.vms:,d}]: active rows lost by targeted refreshes "
                    f"(before, after): {lost}; cloud has {expected}"
                )
                o["rows_lost"] = lost
        return out


def print_statements(backend: str, rs: list[dict[str, Any]]) -> None:
    """The slowest statements of each case's last refresh (--statements)."""
    for r in rs:
        for case in r["cases"]:
            print(
                f"    statements of the last {case['batch']}-vm refresh "
                f"[{backend}, {r['vms']:,d} vms]:"
            )
            for k, (s, n) in sorted(case["statements_last"].items(), key=lambda kv: -kv[1][0])[:12]:
                print(f"      {1000 * s:8.2f} ms  {n:3d}x  {k}")
            n = sum(int(c) for _, c in case["statements_last"].values())
            print(f"      ({n} statements and COPYs in all)")


def print_summary(backends: list[str], results: list[dict[str, Any]]) -> None:
    """Every case in one table, then the goals met or missed."""
    print(f"summary (ms); load average now {load_average()}")
    print(
        f"  {'backend':<11} {'vms in db':>9} {'batch':>5} {'path':<8} {'p50':>8} {'p99':>8} "
        f"{'collect p50':>11} {'persist p50':>11} {'queries':>7}"
    )
    for r in results:
        for c in r["cases"]:
            print(
                f"  {r['backend']:<11} {r['vms']:>9,d} {c['batch']:>5} {c['path']:<8} "
                f"{ms(c['p50'])} {ms(c['p99'])} {ms(c['collect_p50']):>11} "
                f"{ms(c['persist_p50']):>11} {c['queries_median']:>7.0f}"
            )
    goals = {("postgresql", 1): 0.010, ("postgresql", 100): 0.030, ("sqlite", 1): 0.010}
    print("\ngoals: p50 (PG 1 vm <= 10 ms and <= 4x raw, 100 vms <= 30 ms; SQLite 1 vm <= 10 ms);")
    print("ratio large/small inventory <= 1.2 (default path):")
    for backend in backends:
        rs = sorted((r for r in results if r["backend"] == backend), key=lambda r: r["vms"])
        for r in rs:
            by = {(c["batch"], c["path"]): c for c in r["cases"]}
            for batch in sorted({b for b, _ in by}):
                c, raw = by[(batch, "default")], by[(batch, "raw")]
                goal = goals.get((backend, batch))
                verdict = "" if goal is None else (" met" if c["p50"] <= goal else " MISSED")
                print(
                    f"  {backend:<11} {r['vms']:>7,d} vms, {batch:3d} vm(s): p50 "
                    f"{1000 * c['p50']:.2f} ms{verdict}; x{c['p50'] / raw['p50']:.2f} raw "
                    f"({1000 * raw['p50']:.2f} ms); staged path "
                    f"{1000 * by[(batch, 'staged')]['p50']:.2f} ms"
                )
        if len(rs) >= 2:
            small, large = rs[0], rs[-1]
            for cs, cl in zip(small["cases"], large["cases"], strict=True):
                if cs["path"] == "raw":
                    continue
                ratio50 = cl["p50"] / cs["p50"]
                print(
                    f"  {backend:<11} {cs['path']:<8} batch {cs['batch']:3d}: p50 "
                    f"{large['vms']:,d}/{small['vms']:,d} = {ratio50:.2f} "
                    f"({'met' if ratio50 <= 1.2 else 'MISSED'}), p99 ratio "
                    f"{cl['p99'] / cs['p99']:.2f}"
                )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--inventories", default="1000,100000", help="vms in the database")
    parser.add_argument("--iterations-1", type=int, default=200)
    parser.add_argument("--iterations-100", type=int, default=50)
    parser.add_argument(
        "--batches",
        default="1,100",
        help="vms per refresh; 1 runs --iterations-1 times, others --iterations-100 times",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--statements", action="store_true", help="print statement times")
    parser.add_argument("--json", help="write all figures to this file")
    args = parser.parse_args()

    info = machine_info()
    info["code"] = code_fingerprint()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    sizes = [int(x) for x in args.inventories.split(",")]
    cases = [
        (b, args.iterations_1 if b == 1 else args.iterations_100)
        for b in (int(x) for x in args.batches.split(","))
    ]
    print_machine(info)
    print(
        f"targeted refresh benchmark: embedded simulator; per case {WARMUP} warm-up refreshes "
        "(not counted); the inventories' refreshes interleaved; each refresh's vms changed "
        "in the cloud first\n"
    )
    results: list[dict[str, Any]] = []
    for backend in backends:
        rs = await run_backend(backend, sizes, cases, args.seed)
        results += rs
        if args.statements:
            print_statements(backend, rs)
        print()
    print_summary(backends, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2))
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
