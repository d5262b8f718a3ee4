"""Rejections: objects of a refresh that could not be saved, and why.

Flow: collector -> parser (parse errors) -> **Rejection** -> persister (row check,
database errors) -> ``rejected_objects``, logs, metrics, ``refresh_runs``.

A rejected object is not saved and is *not* gone: its existing row (and, for a
vm, its children) stays as it was, and the next event or full refresh tries it
again (DESIGN.md semantic 13).  A :class:`Rejection` names the object the way an
operator would look it up: its collection and ``ref`` (the ems_ref of a
top-level object; ``vm=<ref>,<key>=<value>`` for a child, as ``refreshd refresh
--target`` writes it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RejectReason(enum.Enum):
    """Why an object was not saved (the ``reason`` label of the metric)."""

    PARSE_ERROR = "parse_error"  # the provider could not turn the API object into rows
    MISSING_KEY = "missing_key"  # a key or parent attribute is empty
    INVALID_TYPE = "invalid_type"  # a value of the wrong type for its column
    OUT_OF_RANGE = "out_of_range"  # a number the column cannot hold
    TOO_LONG = "too_long"  # a string longer than a bounded column
    INVALID_JSON = "invalid_json"  # NaN/Infinity or a value JSON cannot hold
    KEY_COLLISION = "key_collision"  # two keys that are equal once normalised
    DATABASE_ERROR = "database_error"  # the database refused the row itself


@dataclass(frozen=True, slots=True)
class Rejection:
    """One object of one collection that this refresh did not save."""

    collection: str
    ref: str
    reason: RejectReason
    error: str
    parent: str | None = None
    """The ems_ref of the parent of a child object (its siblings are protected too)."""


def child_ref(parent_attribute: str, parent: object, key: dict[str, object]) -> str:
    """``vm=vm-1,device_name=sda``: how a child object is named in rejections."""
    parts = [f"{parent_attribute}={parent}"] + [f"{k}={v}" for k, v in key.items()]
    return ",".join(parts)
