"""PostgreSQL: a whole small targeted batch saved by ONE data-modifying statement.

Flow: parser -> persister -> small-batch saver -> **this statement** -> tables.

The statement is derived once from the collection declarations and takes every
row as array parameters (one array per collection attribute, turned back into
rows with ``unnest``), so a targeted refresh needs no temporary table.  Each
collection gets, in save order, data-modifying CTEs that do what the staged
path (``daemon.persistence.statements``) does with several statements:

* ``up_<c>``: the upsert, ``ON CONFLICT DO UPDATE ... WHERE`` some column
  changed (archived rows that reappear are reconnected, same id);
  ``RETURNING (xmax = 0)`` counts created rows, ``created_at = now`` tells
  updated ones apart;
* ``skel_<c>``: a skeletal row (ref only) for each reference to a ``<c>`` that
  is in neither the table nor the batch;
* ``ids_<c>``: id by ems_ref of the ``<c>`` rows the batch refers to: the rows
  the statement's snapshot sees, plus those ``up_<c>`` and ``skel_<c>``
  inserted (all CTEs share one snapshot and cannot see each other's rows);
* ``gone_<c>``: the targeted sweep: rows in scope (targeted refs of a
  top-level collection, children of targeted parents) that the batch does not
  hold are archived or deleted.  Its rows and the upsert's are disjoint, so
  no row is modified twice.

The final ``SELECT`` returns every count in one row.  Foreign keys are checked
at the end of the statement, after every CTE ran.  Identifiers come from the
declarations, never from input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON
from sqlalchemy.dialects import postgresql

from daemon.model.declarations import Collection, CollectionRegistry, Retention
from daemon.model.inventory import Row
from daemon.persistence.db import canonical_json
from daemon.persistence.statements import (
    conflict_action,
    reference_joins,
    targeted_scope,
    upsert_columns,
)

M = "$1::int8"
NOW = "$2::timestamptz"
_PG = postgresql.dialect()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class CountColumn:
    """Which count a column of the statement's result row adds to."""

    collection: str
    field: str  # "created", "updated", "archived" or "deleted"


@dataclass(frozen=True, slots=True)
class PgBatchStatement:
    """The statement, and how to lay out its parameters and read its result row."""

    sql: str
    inputs: tuple[tuple[Collection, frozenset[str]], ...]
    """Collections whose rows are passed, in parameter order, with their JSON attributes."""
    scopes: tuple[str, ...]
    """Top-level collections whose targeted refs are passed (after the rows), in order."""
    counts: tuple[CountColumn, ...]

    def arguments(
        self,
        manager_id: int,
        now: Any,
        rows: dict[str, list[Row]],
        scope_refs: dict[str, list[str]],
    ) -> list[Any]:
        """``$1..$n``: manager, now, one array per attribute, one ref array per scope."""
        args: list[Any] = [manager_id, now]
        for collection, json_attrs in self.inputs:
            batch = rows.get(collection.name, ())
            for attr in collection.staged_attributes:
                if attr in json_attrs:
                    args.append([_json_text(r.get(attr)) for r in batch])
                else:
                    args.append([r.get(attr) for r in batch])
        args += [scope_refs.get(s, []) for s in self.scopes]
        return args


def _json_text(value: Any) -> str | None:
    return None if value is None else canonical_json(value)


def _column_type(collection: Collection, attr: str) -> str:
    """The PostgreSQL type of ``attr`` as passed in (references: ems_ref text; JSON: text)."""
    if any(r.attribute == attr for r in collection.all_references):
        return "text"
    col_type = collection.table.c[attr].type
    if isinstance(col_type, JSON):
        return "text"
    return str(col_type.compile(dialect=_PG))


def _cast(collection: Collection, attr: str) -> str:
    """How an input column is written into the table (JSON text cast to the column type)."""
    if any(r.attribute == attr for r in collection.all_references):
        return f"s.{attr}"
    col_type = collection.table.c[attr].type
    if isinstance(col_type, JSON):
        return f"s.{attr}::{col_type.compile(dialect=_PG).lower()}"
    return f"s.{attr}"


class _Builder:
    def __init__(self, collections: CollectionRegistry) -> None:
        self.collections = collections
        self.n = 2  # $1 manager id, $2 now
        self.ctes: list[str] = []
        self.counts: list[tuple[CountColumn, str]] = []
        # who refers to whom: referenced collection -> [(referring collection, attribute)]
        self.referrers: dict[str, list[tuple[str, str]]] = {}
        self.parents: set[str] = set()
        for c in collections:
            for r in c.references:
                self.referrers.setdefault(r.collection, []).append((c.name, r.attribute))
            if c.parent is not None:
                self.parents.add(c.parent.collection)
                self.referrers.setdefault(c.parent.collection, []).append(
                    (c.name, c.parent.attribute)
                )
        self.skeletal = {r.collection for c in collections for r in c.references}

    def param(self) -> str:
        self.n += 1
        return f"${self.n}"

    def build(self) -> PgBatchStatement:
        inputs = []
        for c in self.collections:
            attrs = c.staged_attributes
            arrays = [f"{self.param()}::{_column_type(c, a)}[]" for a in attrs]
            self.ctes.append(
                f"in_{c.name} ({', '.join(attrs)}) AS (SELECT * FROM unnest({', '.join(arrays)}))"
            )
            json_attrs = frozenset(
                a
                for a in attrs
                if a in c.table.c
                and not any(r.attribute == a for r in c.all_references)
                and isinstance(c.table.c[a].type, JSON)
            )
            inputs.append((c, json_attrs))
        scopes = tuple(c.name for c in self.collections if not c.is_child)
        scope_params = {s: self.param() for s in scopes}
        for c in self.collections:
            self._upsert(c)
            if c.name in self.skeletal:
                self._skeletal(c, f"{scope_params[c.name]}::text[]")
            if c.name in self.referrers:
                self._ids(c)
        for c in self.collections:
            scope_of = c.parent.collection if c.parent else c.name
            if scope_of in scope_params:
                self._sweep(c, f"{scope_params[scope_of]}::text[]")
        select = ", ".join(expr for _, expr in self.counts)
        sql = f"WITH {', '.join(self.ctes)} SELECT {select}"
        return PgBatchStatement(
            sql=sql,
            inputs=tuple(inputs),
            scopes=scopes,
            counts=tuple(col for col, _ in self.counts),
        )

    def _joins(self, c: Collection, *, only_key: bool = False) -> tuple[list[str], dict[str, str]]:
        """Joins resolving the input's references through ``ids_*``; attribute -> expression."""
        return reference_joins(c, prefix="ids_", by_manager=False, only_key=only_key)

    def _upsert(self, c: Collection) -> None:
        table = c.table.name
        joins, exprs = self._joins(c)
        cols, values = upsert_columns(c, exprs, m=M, now=NOW, value_of=lambda attr: _cast(c, attr))
        action = conflict_action(c)
        ems_ref = f", {table}.ems_ref" if c.name in self.referrers else ""
        self.ctes.append(
            f"up_{c.name} AS (INSERT INTO {table} ({', '.join(cols)}) "
            f"SELECT {', '.join(values)} FROM in_{c.name} s {' '.join(joins)} "
            f"ON CONFLICT ({', '.join(c.conflict_columns)}) {action} "
            f"RETURNING {table}.id{ems_ref}, ({table}.xmax = 0) AS inserted, "
            f"({table}.created_at = {NOW}) AS fresh)"
        )
        self.counts.append(
            (
                CountColumn(c.name, "created"),
                f"(SELECT count(*) FROM up_{c.name} WHERE inserted)",
            )
        )
        self.counts.append(
            (
                CountColumn(c.name, "updated"),
                f"(SELECT count(*) FROM up_{c.name} WHERE NOT fresh)",
            )
        )

    def _wanted(self, name: str) -> str:
        """The ems_refs of ``name`` that the batch refers to."""
        return " UNION ".join(f"SELECT {attr} FROM in_{src}" for src, attr in self.referrers[name])

    def _skeletal(self, c: Collection, refs: str) -> None:
        """Skeletal rows; one whose ref is targeted (and so absent from the batch) is
        inserted archived, as the staged path's end-of-refresh sweep would leave it."""
        table = c.table.name
        referring = " UNION ".join(
            f"SELECT {attr} AS ref FROM in_{src}"
            for src, attr in self.referrers[c.name]
            if self.collections[src].reference(attr) is not None
        )
        cols = "manager_id, ems_ref, created_at, updated_at"
        values = f"{M}, r.ref, {NOW}, {NOW}"
        archived = "false"
        if c.retention is Retention.ARCHIVE:
            cols += ", archived_at"
            values += f", CASE WHEN r.ref = ANY({refs}) THEN {NOW} END"
            archived = "archived_at IS NOT NULL"
        self.ctes.append(
            f"skel_{c.name} AS (INSERT INTO {table} ({cols}) "
            f"SELECT {values} FROM ({referring}) r WHERE r.ref IS NOT NULL "
            f"AND NOT EXISTS (SELECT 1 FROM {table} x WHERE x.manager_id = {M} "
            f"AND x.ems_ref = r.ref) "
            f"AND NOT EXISTS (SELECT 1 FROM in_{c.name} i WHERE i.ems_ref = r.ref) "
            f"ON CONFLICT (manager_id, ems_ref) DO NOTHING "
            f"RETURNING id, ems_ref, ({archived}) AS archived)"
        )
        self.counts.append(
            (CountColumn(c.name, "created"), f"(SELECT count(*) FROM skel_{c.name})")
        )
        self.counts.append(
            (
                CountColumn(c.name, "archived"),
                f"(SELECT count(*) FROM skel_{c.name} WHERE archived)",
            )
        )

    def _ids(self, c: Collection) -> None:
        table = c.table.name
        parts = [
            f"SELECT x.id, x.ems_ref FROM {table} x WHERE x.manager_id = {M} "
            f"AND x.ems_ref IN ({self._wanted(c.name)})",
            f"SELECT id, ems_ref FROM up_{c.name} WHERE inserted",
        ]
        if c.name in self.skeletal:
            parts.append(f"SELECT id, ems_ref FROM skel_{c.name}")
        self.ctes.append(f"ids_{c.name} AS ({' UNION ALL '.join(parts)})")

    def _sweep(self, c: Collection, refs: str) -> None:
        table = c.table.name
        joins, exprs = self._joins(c, only_key=True)
        match = []
        if c.parent is not None:
            match.append(f"t.{c.parent.column} = p.id")
        match += [f"t.{c.column_of(a)} = {exprs.get(a, f's.{a}')}" for a in c.key]
        seen = (
            f"NOT EXISTS (SELECT 1 FROM in_{c.name} s {' '.join(joins)} "
            f"WHERE {' AND '.join(match)})"
        )
        scope = targeted_scope(c, m=M, ref_in=f"= ANY({refs})")
        if c.retention is Retention.ARCHIVE:
            verb = f"UPDATE {table} t SET archived_at = {NOW}, updated_at = {NOW}"
            field = "archived"
        else:
            verb = f"DELETE FROM {table} t"
            field = "deleted"
        self.ctes.append(
            f"gone_{c.name} AS ({verb} WHERE {' AND '.join(scope)} AND {seen} RETURNING t.id)"
        )
        self.counts.append((CountColumn(c.name, field), f"(SELECT count(*) FROM gone_{c.name})"))


def pg_batch_statement(collections: CollectionRegistry) -> PgBatchStatement:
    """The one statement that saves a small targeted batch of ``collections``."""
    return _Builder(collections).build()


def read_counts(statement: PgBatchStatement, row: Sequence[int]) -> dict[str, dict[str, int]]:
    """The statement's result row as counts per collection."""
    out: dict[str, dict[str, int]] = {}
    for col, value in zip(statement.counts, row, strict=True):
        fields = out.setdefault(col.collection, {})
        fields[col.field] = fields.get(col.field, 0) + int(value)
    return out
