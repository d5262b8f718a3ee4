"""What isolating bad objects costs, on PostgreSQL (issue 14 item 1).

Flow: hand-made pages -> wiring (Persister; a CHECK constraint added) -> PostgreSQL.

Measured in one run, each against its own floor:

  (a) the row check (normalise + validate in Python) per row, against the full
      refresh that saves the same rows (share of the refresh's time);
  (b) a full refresh of --vms vms that all changed, clean (the floor), then again with
      --bad rows the database refuses (a CHECK constraint the row check cannot
      foresee): the streamed attempt fails, its retry isolates (savepoint bisection);
  (c) a targeted refresh of one vm: clean (the floor), with a value the row check
      normalises (NUL), with one it rejects (NaN), and with one the database
      refuses (saved again row by row).

    .venv/bin/python bench/bad_objects.py --vms 20000 --bad 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from databases import temp_database
from sqlalchemy.exc import DBAPIError
from wiring import wired

from daemon.model.inventory import COLLECTIONS, InventoryPage, Row
from daemon.model.targets import Target, TargetCollection
from daemon.persistence.row_check import RowChecker

MANAGER = "bench"


def vm(i: int, **values: Any) -> dict[str, list[Row]]:
    ref = f"vm-{i:06d}"
    return {
        "vms": [
            {
                "ems_ref": ref,
                "name": f"name-{i}",
                "state": "on",
                "flavor": "f1",
                "image": "img1",
                "tags": {"env": "bench", "i": str(i)},
                "extra": {"zone": "z1"},
            }
            | values
        ],
        "disks": [{"vm": ref, "device_name": d, "size_gb": 10} for d in ("sda", "sdb")],
        "network_ports": [{"vm": ref, "ems_ref": f"{ref}-p1", "mac_address": "02:00"}],
    }


def page_of(vms: list[dict[str, list[Row]]]) -> InventoryPage:
    page = InventoryPage(covers=frozenset({"disks", "network_ports", "vm_security_groups"}))
    for rows in vms:
        for collection, r in rows.items():
            page.extend(collection, r)
    return page


def full_pages(n: int, *, bad: set[int], per_page: int = 1000) -> list[InventoryPage]:
    first = InventoryPage()
    first.extend("flavors", [{"ems_ref": "f1", "name": "f1", "cpus": 1}])
    first.extend("images", [{"ems_ref": "img1", "name": "img1", "os": "linux"}])
    vms = [vm(i, name="refused" if i in bad else f"name-{i}") for i in range(n)]
    return [first] + [page_of(vms[i : i + per_page]) for i in range(0, n, per_page)]


async def replay(pages: list[InventoryPage]) -> Any:
    for page in pages:
        yield page


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=20000)
    parser.add_argument("--bad", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}")
    async with (
        temp_database(f"refreshd_bench_bad_{uuid.uuid4().hex[:8]}") as dsn,
        wired(dsn, {}) as refreshd,
    ):
        async with refreshd.engine.begin() as conn:
            await conn.exec_driver_sql(
                "ALTER TABLE vms ADD CONSTRAINT bench_refused CHECK (name <> 'refused')"
            )
        persister = refreshd.persister
        await persister.ensure_manager(MANAGER, "bench")

        # (a) + (b): full refreshes
        clean = full_pages(args.vms, bad=set())
        t0 = time.perf_counter()
        first = await persister.save(MANAGER, replay(clean))
        t_first = time.perf_counter() - t0
        rows = sum(len(p) for p in clean)
        checkers = {c.name: RowChecker(c) for c in COLLECTIONS}
        t0 = time.process_time()
        for page in clean:
            for name, r in page.rows.items():
                checkers[name].check(r)
        t_check = time.process_time() - t0
        print(
            f"(a) row check: {t_check / rows * 1e6:.2f} us/row CPU; {rows} rows in "
            f"{t_check:.3f}s = {100 * t_check / t_first:.1f}% of the first full refresh "
            f"({t_first:.2f}s, {first.rows_written} rows written)"
        )

        def changed(bad: set[int], state: str) -> list[InventoryPage]:
            pages = full_pages(args.vms, bad=bad)
            for p in pages:  # every vm changes, so every page is written
                for r in p.rows.get("vms", []):
                    r["state"] = state
            return pages

        t0 = time.perf_counter()
        await persister.save(MANAGER, replay(changed(set(), "off")))
        t_floor = time.perf_counter() - t0
        step = max(1, args.vms // max(1, args.bad))
        bad = set(range(0, args.vms, step)[: args.bad])
        t0 = time.perf_counter()
        # streamed: the first attempt fails, its retry isolates (bisection)
        with contextlib.suppress(DBAPIError):
            await persister.save(MANAGER, replay(changed(bad, "on")))
        t_failed = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = await persister.save(MANAGER, replay(changed(bad, "on")))
        t_bad = time.perf_counter() - t0
        print(
            f"(b) full refresh of {args.vms} vms, every vm changed: clean {t_floor:.2f}s (floor); "
            f"with {len(result.rejected)} rows refused by the database: failed attempt "
            f"{t_failed:.2f}s, isolating retry {t_bad:.2f}s = {t_bad / t_floor:.2f}x the floor; "
            f"{result.counts['vms'].updated} vms updated"
        )

        # (c): targeted refreshes of one vm
        async def targeted(label: str, **values: Any) -> float:
            times = []
            for k in range(args.repeat):
                row = vm(1, state=f"s{k}", **values)
                page = page_of([row])
                targets = TargetCollection(MANAGER, [Target.of(MANAGER, "vms", "vm-000001")])
                t0 = time.perf_counter()
                await persister.save(MANAGER, [page], targets=targets)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        floor = await targeted("clean")
        for label, values in (
            ("a NUL in the name (normalised)", {"name": "a\x00b"}),
            ("NaN in extra (rejected by the row check)", {"extra": {"x": float("nan")}}),
            ("a row the database refuses (saved again)", {"name": "refused"}),
        ):
            t = await targeted(label, **values)
            print(
                f"(c) targeted refresh of 1 vm, {label}: median {t * 1000:.2f} ms = "
                f"{t / floor:.2f}x the clean one ({floor * 1000:.2f} ms)"
            )
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    asyncio.run(main())
