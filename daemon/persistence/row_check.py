"""Row check: normalise parsed rows and set aside those their table cannot hold.

Flow: parser -> InventoryPage -> **row check** -> stage tables -> upsert -> tables.

Run on every page before it is written, in Python (no round trip), against the
declared column types, so one bad object cannot fail the statement that saves
its whole page (DESIGN.md semantic 13).

Normalised, then stored (documented in docs/design.md):

* a NUL character (``\\x00``; PostgreSQL ``text`` and ``jsonb`` cannot hold it)
  and a lone surrogate (``\\ud800``..``\\udfff`` not in a pair; not encodable as
  UTF-8, refused by both databases) become U+FFFD REPLACEMENT CHARACTER, in
  plain columns, in references and in JSON strings and keys alike.  The mapping
  is deterministic, so a normalised ems_ref names the same row on every refresh
  (targets' refs are normalised the same way).  Two keys of one page that are
  different in the cloud but equal once normalised (``a\\x00`` and ``a\\ufffd``)
  would share a row: the normalised one is rejected (``key_collision``).

Rejected (:class:`~daemon.model.rejection.Rejection`), the rest of the page is saved:

* an empty key or parent attribute (``missing_key``);
* a value of the wrong type for its column, an integer its column cannot hold,
  a string longer than a bounded ``varchar(n)``, NaN or Infinity in JSON.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Integer, String
from sqlalchemy.types import TypeEngine

from daemon.model.declarations import Collection
from daemon.model.inventory import Row
from daemon.model.rejection import Rejection, RejectReason, child_ref

REPLACEMENT = "\ufffd"
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


class _Bad(Exception):
    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def clean_text(value: str) -> str:
    """``value`` with NUL and lone surrogates replaced by U+FFFD (the same object if clean).

    A surrogate *pair* held as two code points (``"\\ud83d\\ude00"``) is joined into
    the character it encodes; each lone surrogate becomes one U+FFFD.
    """
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return value.replace("\x00", REPLACEMENT) if "\x00" in value else value


def clean_json(value: Any) -> Any:
    """``value`` with every string (keys too) cleaned; raises on NaN/Infinity."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        out: dict[Any, Any] | None = None
        for k, v in value.items():
            ck = clean_text(k) if isinstance(k, str) else k
            cv = clean_json(v)
            if out is None and (ck is not k or cv is not v):
                out = {}
                for k2, v2 in value.items():
                    if k2 is k:
                        break
                    out[k2] = v2
            if out is not None:
                out[ck] = cv
        return value if out is None else out
    if isinstance(value, list | tuple):
        items = [clean_json(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, float) and not math.isfinite(value):
        raise _Bad(RejectReason.INVALID_JSON, f"{value!r} is not valid JSON")
    return value


class _Kind(enum.Enum):
    """How a column's values are checked."""

    TEXT = "text"
    INT = "int"
    FLOAT = "float"
    JSON = "json"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class _Field:
    attribute: str
    kind: _Kind
    nullable: bool
    length: int | None = None
    bounds: tuple[int, int] = INT64


def _field(collection: Collection, attribute: str, *, required: bool) -> _Field:
    if any(r.attribute == attribute for r in collection.all_references):
        return _Field(attribute, _Kind.TEXT, not required)
    column = collection.table.c[attribute]
    nullable = bool(column.nullable) and not required
    return _field_of_type(attribute, column.type, nullable)


def _field_of_type(attribute: str, type_: TypeEngine[Any], nullable: bool) -> _Field:
    if isinstance(type_, JSON):
        return _Field(attribute, _Kind.JSON, nullable)
    if isinstance(type_, String):
        return _Field(attribute, _Kind.TEXT, nullable, length=type_.length)
    if isinstance(type_, BigInteger):
        return _Field(attribute, _Kind.INT, nullable, bounds=INT64)
    if isinstance(type_, Integer):
        return _Field(attribute, _Kind.INT, nullable, bounds=INT32)
    if isinstance(type_, Float):
        return _Field(attribute, _Kind.FLOAT, nullable)
    return _Field(attribute, _Kind.OTHER, nullable)


class RowChecker:
    """Checks the rows of one collection (build once per collection, reuse)."""

    def __init__(self, collection: Collection) -> None:
        self.collection = collection
        parent = collection.parent.attribute if collection.parent else None
        self._parent = parent
        self._key = collection.key
        required = {*collection.key, *((parent,) if parent else ())}
        self._fields = tuple(
            _field(collection, a, required=a in required) for a in collection.staged_attributes
        )

    def ref_of(self, row: Mapping[str, Any]) -> str:
        """How an operator names this row (see :mod:`daemon.model.rejection`)."""
        if self._parent is None:
            return str(row.get("ems_ref") if "ems_ref" in self._key else row.get(self._key[0]))
        return child_ref(self._parent, row.get(self._parent), {k: row.get(k) for k in self._key})

    def check(self, rows: Iterable[Row]) -> tuple[list[Row], list[Rejection]]:
        """The rows to save (normalised) and the rejections of the others."""
        kept: list[Row] = []
        rejected: list[Rejection] = []
        raw_keys: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # normalised -> as given
        key_attrs = ((self._parent,) if self._parent else ()) + self._key
        for row in rows:
            try:
                clean = self._clean(row)
            except _Bad as bad:
                rejected.append(self._rejection(row, bad.reason, str(bad)))
                continue
            raw = tuple(row.get(a) for a in key_attrs)
            key = raw if clean is row else tuple(clean.get(a) for a in key_attrs)
            if raw_keys.setdefault(key, raw) != raw:
                rejected.append(
                    self._rejection(
                        row,
                        RejectReason.KEY_COLLISION,
                        "its key equals another object's once NUL/surrogates are replaced",
                    )
                )
                continue
            kept.append(clean)
        return kept, rejected

    def database_rejection(self, row: Mapping[str, Any], error: str) -> Rejection:
        """The rejection of a checked row the database refused."""
        return self._rejection(row, RejectReason.DATABASE_ERROR, error)

    def _rejection(self, row: Mapping[str, Any], reason: RejectReason, error: str) -> Rejection:
        parent = row.get(self._parent) if self._parent else None
        return Rejection(
            self.collection.name,
            clean_text(self.ref_of(row)),
            reason,
            error,
            parent=clean_text(parent) if isinstance(parent, str) else None,
        )

    def _clean(self, row: Row) -> Row:
        out: Row | None = None
        for f in self._fields:
            value = row.get(f.attribute)
            new = self._value(f, value)
            if new is not value:
                if out is None:
                    out = dict(row)
                out[f.attribute] = new
        return row if out is None else out

    def _value(self, f: _Field, value: Any) -> Any:
        if value is None:
            if not f.nullable:
                raise _Bad(RejectReason.MISSING_KEY, f"{f.attribute} is missing")
            return None
        if f.kind is _Kind.TEXT:
            if not isinstance(value, str):
                raise _Bad(RejectReason.INVALID_TYPE, f"{f.attribute}: not a string: {value!r:.80}")
            if not value and not f.nullable:
                raise _Bad(RejectReason.MISSING_KEY, f"{f.attribute} is empty")
            value = clean_text(value)
            if f.length is not None and len(value) > f.length:
                raise _Bad(
                    RejectReason.TOO_LONG,
                    f"{f.attribute}: {len(value)} characters, the column holds {f.length}",
                )
            return value
        if f.kind is _Kind.INT:
            if type(value) is not int:
                raise _Bad(
                    RejectReason.INVALID_TYPE, f"{f.attribute}: not an integer: {value!r:.80}"
                )
            if not f.bounds[0] <= value <= f.bounds[1]:
                raise _Bad(RejectReason.OUT_OF_RANGE, f"{f.attribute}: {value} is out of range")
            return value
        if f.kind is _Kind.FLOAT:
            if type(value) not in (int, float):
                raise _Bad(RejectReason.INVALID_TYPE, f"{f.attribute}: not a number: {value!r:.80}")
            return value
        if f.kind is _Kind.JSON:
            return clean_json(value)
        return value


def clean_ref(value: str) -> str:
    """A target's ref normalised like the rows' keys (so it names the same row)."""
    return clean_text(value)


def clean_rejection(rejection: Rejection) -> Rejection:
    """A provider's rejection with its ref, parent and error storable (and matching rows)."""
    parent = rejection.parent
    return Rejection(
        rejection.collection,
        clean_text(rejection.ref),
        rejection.reason,
        clean_text(rejection.error),
        parent=clean_text(parent) if parent is not None else None,
    )
