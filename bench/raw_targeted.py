"""The floor of a targeted refresh: a hand-written transaction doing the same writes.

Flow: targeted_cases.one_refresh (path "raw") -> **raw transaction** -> database.

Used by bench/targeted_refresh.py, interleaved with the daemon's refreshes, so the
daemon's figures are a ratio to what the database itself costs in the same run.

For the vms of a batch (rows as the parser makes them): upsert the vms (flavor and
image resolved by subselect, only changed rows written), upsert their disks and
ports (same), insert their group links, delete the children of these vms that the
batch no longer has, commit.  PostgreSQL: one asyncpg connection, prepared
statements, rows as arrays (BEGIN + 7 statements + COMMIT).  SQLite: one aiosqlite
connection, ``executemany`` per table (BEGIN + 7 + COMMIT).  No lock, no skeletal
rows, no counts, no ``refresh_runs`` row: what a hand-written job would skip.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from daemon.persistence.db import canonical_json

PG_VMS = """
INSERT INTO vms (manager_id, ems_ref, name, state, flavor_id, image_id, tags, extra,
                 created_at, updated_at)
SELECT $1, s.ems_ref, s.name, s.state, f.id, i.id, s.tags::jsonb, s.extra::jsonb, $2, $2
FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[])
     AS s(ems_ref, name, state, flavor, image, tags, extra)
LEFT JOIN flavors f ON f.manager_id = $1 AND f.ems_ref = s.flavor
LEFT JOIN images i ON i.manager_id = $1 AND i.ems_ref = s.image
ON CONFLICT (manager_id, ems_ref) DO UPDATE SET name = excluded.name, state = excluded.state,
  flavor_id = excluded.flavor_id, image_id = excluded.image_id, tags = excluded.tags,
  extra = excluded.extra, updated_at = excluded.updated_at, archived_at = NULL
WHERE (vms.name, vms.state, vms.flavor_id, vms.image_id, vms.tags, vms.extra, vms.archived_at)
  IS DISTINCT FROM (excluded.name, excluded.state, excluded.flavor_id, excluded.image_id,
                    excluded.tags, excluded.extra, NULL)
"""
PG_DISKS = """
INSERT INTO disks (manager_id, vm_id, device_name, size_gb, extra, created_at, updated_at)
SELECT $1, v.id, s.device_name, s.size_gb, s.extra::jsonb, $2, $2
FROM unnest($3::text[], $4::text[], $5::int4[], $6::text[]) AS s(vm, device_name, size_gb, extra)
JOIN vms v ON v.manager_id = $1 AND v.ems_ref = s.vm
ON CONFLICT (vm_id, device_name) DO UPDATE SET size_gb = excluded.size_gb,
  extra = excluded.extra, updated_at = excluded.updated_at
WHERE (disks.size_gb, disks.extra) IS DISTINCT FROM (excluded.size_gb, excluded.extra)
"""
PG_PORTS = """
INSERT INTO network_ports (manager_id, vm_id, ems_ref, mac_address, ip_address, extra,
                           created_at, updated_at)
SELECT $1, v.id, s.ems_ref, s.mac, s.ip, s.extra::jsonb, $2, $2
FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
     AS s(vm, ems_ref, mac, ip, extra)
JOIN vms v ON v.manager_id = $1 AND v.ems_ref = s.vm
ON CONFLICT (vm_id, ems_ref) DO UPDATE SET mac_address = excluded.mac_address,
  ip_address = excluded.ip_address, extra = excluded.extra, updated_at = excluded.updated_at
WHERE (network_ports.mac_address, network_ports.ip_address, network_ports.extra)
  IS DISTINCT FROM (excluded.mac_address, excluded.ip_address, excluded.extra)
"""
PG_LINKS = """
INSERT INTO vm_security_groups (manager_id, vm_id, security_group_id, created_at, updated_at)
SELECT $1, v.id, g.id, $2, $2
FROM unnest($3::text[], $4::text[]) AS s(vm, sg)
JOIN vms v ON v.manager_id = $1 AND v.ems_ref = s.vm
JOIN security_groups g ON g.manager_id = $1 AND g.ems_ref = s.sg
ON CONFLICT (vm_id, security_group_id) DO NOTHING
"""
PG_DELETE_DISKS = """
DELETE FROM disks d USING vms v
WHERE v.manager_id = $1 AND v.ems_ref = ANY($2::text[]) AND d.vm_id = v.id
  AND (v.ems_ref, d.device_name) NOT IN (SELECT * FROM unnest($3::text[], $4::text[]))
"""
PG_DELETE_PORTS = """
DELETE FROM network_ports d USING vms v
WHERE v.manager_id = $1 AND v.ems_ref = ANY($2::text[]) AND d.vm_id = v.id
  AND (v.ems_ref, d.ems_ref) NOT IN (SELECT * FROM unnest($3::text[], $4::text[]))
"""
PG_DELETE_LINKS = """
DELETE FROM vm_security_groups d USING vms v, security_groups g
WHERE v.manager_id = $1 AND v.ems_ref = ANY($2::text[]) AND d.vm_id = v.id
  AND g.id = d.security_group_id
  AND (v.ems_ref, g.ems_ref) NOT IN (SELECT * FROM unnest($3::text[], $4::text[]))
"""


def _col(rows: list[dict[str, Any]], attr: str, *, json_text: bool = False) -> list[Any]:
    if json_text:
        return [None if r.get(attr) is None else canonical_json(r[attr]) for r in rows]
    return [r.get(attr) for r in rows]


async def pg_raw_refresh(conn: Any, manager_id: int, page: dict[str, list[dict[str, Any]]]) -> None:
    """The hand-written PostgreSQL transaction for the vms of ``page`` (asyncpg ``conn``)."""
    now = datetime.now(UTC)
    vms, disks = page.get("vms", []), page.get("disks", [])
    ports, links = page.get("network_ports", []), page.get("vm_security_groups", [])
    refs = _col(vms, "ems_ref")
    async with conn.transaction():
        await conn.execute(
            PG_VMS, manager_id, now, refs, _col(vms, "name"), _col(vms, "state"),
            _col(vms, "flavor"), _col(vms, "image"), _col(vms, "tags", json_text=True),
            _col(vms, "extra", json_text=True),
        )  # fmt: skip
        await conn.execute(
            PG_DISKS, manager_id, now, _col(disks, "vm"), _col(disks, "device_name"),
            _col(disks, "size_gb"), _col(disks, "extra", json_text=True),
        )  # fmt: skip
        await conn.execute(
            PG_PORTS, manager_id, now, _col(ports, "vm"), _col(ports, "ems_ref"),
            _col(ports, "mac_address"), _col(ports, "ip_address"),
            _col(ports, "extra", json_text=True),
        )  # fmt: skip
        await conn.execute(
            PG_LINKS, manager_id, now, _col(links, "vm"), _col(links, "security_group")
        )
        await conn.execute(
            PG_DELETE_DISKS, manager_id, refs, _col(disks, "vm"), _col(disks, "device_name")
        )
        await conn.execute(
            PG_DELETE_PORTS, manager_id, refs, _col(ports, "vm"), _col(ports, "ems_ref")
        )
        await conn.execute(
            PG_DELETE_LINKS, manager_id, refs, _col(links, "vm"), _col(links, "security_group")
        )


SQ_VMS = """
INSERT INTO vms (manager_id, ems_ref, name, state, flavor_id, image_id, tags, extra,
                 created_at, updated_at)
VALUES (:m, :ems_ref, :name, :state,
        (SELECT id FROM flavors WHERE manager_id = :m AND ems_ref = :flavor),
        (SELECT id FROM images WHERE manager_id = :m AND ems_ref = :image),
        :tags, :extra, :now, :now)
ON CONFLICT (manager_id, ems_ref) DO UPDATE SET name = excluded.name, state = excluded.state,
  flavor_id = excluded.flavor_id, image_id = excluded.image_id, tags = excluded.tags,
  extra = excluded.extra, updated_at = excluded.updated_at, archived_at = NULL
WHERE vms.name IS NOT excluded.name OR vms.state IS NOT excluded.state
  OR vms.flavor_id IS NOT excluded.flavor_id OR vms.image_id IS NOT excluded.image_id
  OR vms.tags IS NOT excluded.tags OR vms.extra IS NOT excluded.extra
  OR vms.archived_at IS NOT NULL
"""
SQ_DISKS = """
INSERT INTO disks (manager_id, vm_id, device_name, size_gb, extra, created_at, updated_at)
SELECT :m, v.id, :device_name, :size_gb, :extra, :now, :now FROM vms v
WHERE v.manager_id = :m AND v.ems_ref = :vm
ON CONFLICT (vm_id, device_name) DO UPDATE SET size_gb = excluded.size_gb,
  extra = excluded.extra, updated_at = excluded.updated_at
WHERE disks.size_gb IS NOT excluded.size_gb OR disks.extra IS NOT excluded.extra
"""
SQ_PORTS = """
INSERT INTO network_ports (manager_id, vm_id, ems_ref, mac_address, ip_address, extra,
                           created_at, updated_at)
SELECT :m, v.id, :ems_ref, :mac_address, :ip_address, :extra, :now, :now FROM vms v
WHERE v.manager_id = :m AND v.ems_ref = :vm
ON CONFLICT (vm_id, ems_ref) DO UPDATE SET mac_address = excluded.mac_address,
  ip_address = excluded.ip_address, extra = excluded.extra, updated_at = excluded.updated_at
WHERE network_ports.mac_address IS NOT excluded.mac_address
  OR network_ports.ip_address IS NOT excluded.ip_address
  OR network_ports.extra IS NOT excluded.extra
"""
SQ_LINKS = """
INSERT INTO vm_security_groups (manager_id, vm_id, security_group_id, created_at, updated_at)
SELECT :m, v.id, g.id, :now, :now FROM vms v JOIN security_groups g
  ON g.manager_id = :m AND g.ems_ref = :security_group
WHERE v.manager_id = :m AND v.ems_ref = :vm
ON CONFLICT (vm_id, security_group_id) DO NOTHING
"""
SQ_DELETE = """
DELETE FROM {table} WHERE vm_id = (SELECT id FROM vms WHERE manager_id = :m AND ems_ref = :vm)
  AND {key} NOT IN (SELECT value FROM json_each(:keep))
"""

SQ_DELETE_LINKS = """
DELETE FROM vm_security_groups
WHERE vm_id = (SELECT id FROM vms WHERE manager_id = :m AND ems_ref = :vm)
  AND security_group_id NOT IN (SELECT id FROM security_groups
    WHERE manager_id = :m AND ems_ref IN (SELECT value FROM json_each(:keep)))
"""


async def sqlite_raw_refresh(
    conn: Any, manager_id: int, page: dict[str, list[dict[str, Any]]], now: str
) -> None:
    """The hand-written SQLite transaction for the vms of ``page`` (aiosqlite ``conn``)."""
    base = {"m": manager_id, "now": now}

    def rows(coll: str, *json_attrs: str) -> list[dict[str, Any]]:
        out = []
        for r in page.get(coll, []):
            row = base | r
            for a in json_attrs:
                row[a] = None if r.get(a) is None else canonical_json(r[a])
            out.append(row)
        return out

    await conn.execute("BEGIN IMMEDIATE")
    try:
        vms = [{"extra": None, "tags": None} | r for r in rows("vms", "tags", "extra")]
        await conn.executemany(SQ_VMS, vms)
        await conn.executemany(SQ_DISKS, [{"extra": None} | r for r in rows("disks", "extra")])
        ports = [{"extra": None, "ip_address": None} | r for r in rows("network_ports", "extra")]
        await conn.executemany(SQ_PORTS, ports)
        await conn.executemany(SQ_LINKS, rows("vm_security_groups"))
        by_vm: dict[str, dict[str, list[str]]] = {r["ems_ref"]: {} for r in page.get("vms", [])}
        for coll, attr in (("disks", "device_name"), ("network_ports", "ems_ref")):
            for r in page.get(coll, []):
                by_vm.setdefault(r["vm"], {}).setdefault(coll, []).append(r[attr])
        for r in page.get("vm_security_groups", []):
            by_vm.setdefault(r["vm"], {}).setdefault("links", []).append(r["security_group"])
        for coll, key in (
            ("disks", "device_name"),
            ("network_ports", "ems_ref"),
            ("links", "security_group_id"),
        ):
            await conn.executemany(
                SQ_DELETE_LINKS if coll == "links" else SQ_DELETE.format(table=coll, key=key),
                [
                    base | {"vm": vm, "keep": json.dumps(kept.get(coll, []))}
                    for vm, kept in by_vm.items()
                ],
            )
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
