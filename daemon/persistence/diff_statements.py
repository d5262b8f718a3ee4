"""Compare before writing: the statements that save a staged page by writing only what differs.

Flow: parser -> persister -> stage tables -> **diff statements** -> tables.

A staged row is joined to the row stored under its key (``LEFT JOIN`` on the
unique key, references resolved to ids as in :mod:`daemon.persistence.statements`) and
classified before anything is written:

* no stored row: it is ``INSERT``-ed (plain insert; the manager's advisory lock,
  or SQLite's single writer, keeps anyone else from inserting the same key);
* a stored row that differs (a column ``IS DISTINCT FROM`` the new value, or the
  row was archived): it is ``UPDATE``-d by id;
* a stored row that is equal: it is not written, so it is neither locked nor
  dirtied, and a refresh that changes nothing writes nothing (DESIGN.md 5).

Counts are exact: *created* is the number of rows inserted, *updated* the number
of rows updated that existed before this refresh (``created_at <> :now``); a row
created earlier in the same refresh (a skeletal row filled in by a later page) is
neither, as it was already counted created.

When the collection is *tracked* (it will be swept), the ids of every matched or
inserted row go into ``seen_<collection>``.  A full refresh does not track a
collection that had no active row when it began and that no other collection
refers to (no skeletal row can appear in it): nothing of it can be swept.

PostgreSQL runs one statement per collection and page (data-modifying CTEs,
counts aggregated in SQL, so one result row comes back); SQLite, which has no
DML in CTEs, runs update, insert and mark-seen separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from sqlalchemy import TextClause, text

from daemon.model.declarations import Collection, Retention
from daemon.persistence.statements import _binds, _key_match, reference_joins, statements_for


@dataclass(frozen=True, slots=True)
class DiffStatements:
    """The compare-before-write statements of one collection."""

    pg_save: TextClause
    """PostgreSQL: insert new, update changed, mark seen; returns (created, updated)."""
    pg_save_untracked: TextClause
    """PostgreSQL: the same without marking seen rows."""
    sqlite_update: TextClause | None
    """SQLite: rewrite the stored rows that differ; returns ``created_at = :now`` per row
    (None: the collection has nothing to update)."""
    sqlite_insert: TextClause
    """SQLite: insert the staged rows that have no stored row (rowcount = created)."""


def _lateral_joins(collection: Collection) -> tuple[list[str], dict[str, str]]:
    """PostgreSQL: :func:`~daemon.persistence.statements.reference_joins` as one index
    lookup per staged row.

    A plain join lets the planner, which has no statistics on the stage and often
    none yet on a small referenced table, materialize every image of the manager
    and compare each staged vm with each of them (2,000 x 1,000 per page at 100k
    vms).  ``LIMIT 1`` keeps the subquery from being flattened into such a join:
    each reference is a probe of the ``(manager_id, ems_ref)`` unique index.  The
    stored row is found the same way (:func:`_source`), so no plan of a page
    depends on statistics the refresh itself makes stale.
    """
    joins: list[str] = []
    exprs: dict[str, str] = {}
    refs = [(collection.parent, "p", "JOIN")] if collection.parent is not None else []
    refs += [
        (r, f"r_{r.attribute}", "JOIN" if r.attribute in collection.key else "LEFT JOIN")
        for r in collection.references
    ]
    for ref, alias, kind in refs:
        joins.append(
            f"{kind} LATERAL (SELECT x.id FROM {ref.collection} x WHERE x.manager_id = :m "
            f"AND x.ems_ref = s.{ref.attribute} LIMIT 1) {alias} ON true"
        )
        exprs[ref.attribute] = f"{alias}.id"
    return joins, exprs


def _source(
    collection: Collection, stage: str, *, lateral: bool = False
) -> tuple[list[str], str, str]:
    """Columns of the resolved source, its FROM clause (with ``t`` left-joined), and
    the condition "the stored row ``t`` differs from the staged one"."""
    table = collection.table.name
    joins, exprs = _lateral_joins(collection) if lateral else reference_joins(collection)
    cols: list[tuple[str, str]] = []  # (table column, SQL expression)
    if collection.parent is not None:
        cols.append((collection.parent.column, exprs[collection.parent.attribute]))
    for attr in collection.staged_attributes:
        if collection.parent is not None and attr == collection.parent.attribute:
            continue
        cols.append((collection.column_of(attr), exprs.get(attr, f"s.{attr}")))
    expr_of = dict(cols)
    changed = [f"t.{c} IS DISTINCT FROM {expr_of[c]}" for c in collection.updatable_columns]
    if collection.retention is Retention.ARCHIVE:
        changed.append("t.archived_at IS NOT NULL")
    select = [f"{e} AS {c}" for c, e in cols]
    if lateral:  # the stored row too: one probe of the unique key, whatever the statistics
        stored = (
            f"LEFT JOIN LATERAL (SELECT * FROM {table} y WHERE "
            f"{_key_match(collection, exprs, 'y')} LIMIT 1) t ON true"
        )
    else:
        stored = f"LEFT JOIN {table} t ON {_key_match(collection, exprs)}"
    source = f"FROM {stage} s {' '.join(joins)} {stored}"
    return select, source, " OR ".join(changed) or "false"


def _set_clause(collection: Collection, src: str) -> str:
    sets = [f"{c} = {src}.{c}" for c in collection.updatable_columns]
    sets.append("updated_at = :now")
    if collection.retention is Retention.ARCHIVE:
        sets.append("archived_at = NULL")
    return ", ".join(sets)


def _insert_columns(collection: Collection) -> list[str]:
    cols = ["manager_id"]
    if collection.parent is not None:
        cols.append(collection.parent.column)
    for attr in collection.staged_attributes:
        if collection.parent is not None and attr == collection.parent.attribute:
            continue
        cols.append(collection.column_of(attr))
    return cols


def _pg_save(collection: Collection, *, seen: str | None) -> TextClause:
    st = statements_for(collection)
    table = collection.table.name
    select, source, changed = _source(collection, st.stage.name, lateral=True)
    data_cols = _insert_columns(collection)[1:]
    parts = [
        f"src AS (SELECT {', '.join(select)}, t.id AS tid, ({changed}) AS changed {source})",
        f"ins AS (INSERT INTO {table} ({', '.join(['manager_id', *data_cols])}, "
        f"created_at, updated_at) SELECT :m, {', '.join(f'src.{c}' for c in data_cols)}, "
        f":now, :now FROM src WHERE src.tid IS NULL RETURNING id)",
    ]
    if collection.updatable_columns or collection.retention is Retention.ARCHIVE:
        parts.append(
            f"upd AS (UPDATE {table} SET {_set_clause(collection, 'src')} FROM src "
            f"WHERE {table}.id = src.tid AND src.changed "
            f"RETURNING {table}.created_at = :now AS fresh)"
        )
        updated = "(SELECT count(*) FROM upd WHERE NOT fresh)"
    else:
        updated = "0"
    if seen is not None:
        parts.append(
            f"marked AS (INSERT INTO {seen} (id) SELECT id FROM ins UNION ALL "
            f"SELECT tid FROM src WHERE tid IS NOT NULL ON CONFLICT (id) DO NOTHING)"
        )
    sql = f"WITH {', '.join(parts)} SELECT (SELECT count(*) FROM ins) AS created, {updated}"
    return _binds(text(sql))


def _sqlite_update(collection: Collection) -> TextClause | None:
    """The stored rows that differ, rewritten through the upsert path.

    An ``UPDATE ... FROM (staged rows that differ)`` made SQLite scan the whole table
    for each page (no statistics; it put the table in the outer loop).  An upsert
    fed only the rows that differ reaches each stored row by its unique key.
    """
    if not (collection.updatable_columns or collection.retention is Retention.ARCHIVE):
        return None
    st = statements_for(collection)
    table = collection.table.name
    select, source, changed = _source(collection, st.stage.name)
    values = [e.rsplit(" AS ", 1)[0] for e in select]
    sets = [f"{c} = excluded.{c}" for c in collection.updatable_columns]
    sets.append("updated_at = excluded.updated_at")
    if collection.retention is Retention.ARCHIVE:
        sets.append("archived_at = NULL")
    sql = (
        f"INSERT INTO {table} ({', '.join(_insert_columns(collection))}, created_at, "
        f"updated_at) SELECT :m, {', '.join(values)}, :now, :now {source} "
        f"WHERE t.id IS NOT NULL AND ({changed}) "
        f"ON CONFLICT ({', '.join(collection.conflict_columns)}) DO UPDATE SET "
        f"{', '.join(sets)} RETURNING {table}.created_at = :now"
    )
    return _binds(text(sql))


def _sqlite_insert(collection: Collection) -> TextClause:
    st = statements_for(collection)
    table = collection.table.name
    select, source, _ = _source(collection, st.stage.name)
    cols = _insert_columns(collection)
    values = [e.rsplit(" AS ", 1)[0] for e in select]
    sql = (
        f"INSERT INTO {table} ({', '.join(cols)}, created_at, updated_at) "
        f"SELECT :m, {', '.join(values)}, :now, :now {source} WHERE t.id IS NULL"
    )
    return _binds(text(sql))


@cache
def diff_statements_for(collection: Collection) -> DiffStatements:
    seen = statements_for(collection).seen.name
    return DiffStatements(
        pg_save=_pg_save(collection, seen=seen),
        pg_save_untracked=_pg_save(collection, seen=None),
        sqlite_update=_sqlite_update(collection),
        sqlite_insert=_sqlite_insert(collection),
    )
