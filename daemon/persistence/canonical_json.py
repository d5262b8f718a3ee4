"""The one JSON text form refreshd stores, produced as fast as this machine allows.

Flow: parser -> persister -> stage tables (**JSON text**) -> tables.

``canonical_json(value)`` is, byte for byte, what
``json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)`` returns:
compact, keys sorted, non-ASCII escaped as ``\\uXXXX``.  The text must never
change for equal values: SQLite compares stored JSON as text, so a different
spelling of the same value would be saved as a change (PostgreSQL compares
JSONB values and would not care).

orjson (about 5x faster, measured in bench/RESULTS.md) writes that exact text
for the common case.  Where it may not, the standard library encodes instead:

* output with a byte outside printable ASCII (``json.dumps`` escapes non-ASCII
  text and DEL as ``\\uXXXX``, orjson does not);
* floats written with a negative exponent of one digit, or as ``0.0000...``
  (orjson writes ``1e-7`` and ``0.00005`` where Python writes ``1e-07`` and
  ``5e-05``) - a cheap search of the output finds them, with a few false alarms
  on strings that look alike;
* anything orjson refuses or would encode its own way (integers beyond 64 bits,
  non-string keys, datetimes, dataclasses, subclasses of built-in types: all go
  to ``default=str`` or the key rules of ``json.dumps``).

One difference is accepted: NaN and infinities, which are not JSON, come out as
``null`` (``json.dumps`` writes ``NaN``, which PostgreSQL refuses anyway).
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_OPTIONS = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
# a byte json.dumps would have escaped (outside printable ASCII), or a float it spells otherwise
_SPELLED_DIFFERENTLY = re.compile(rb"[^\x20-\x7e]|\de-\d|0\.0000")


def _standard(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _refuse(value: Any) -> Any:
    raise TypeError(type(value).__name__)


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys, identical to the standard library's text."""
    try:
        out = orjson.dumps(value, default=_refuse, option=_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _standard(value)
    if _SPELLED_DIFFERENTLY.search(out):
        return _standard(value)
    return out.decode()
