"""The JSON text refreshd stores never changes for equal values (SQLite compares it as text).

The fast encoder must write exactly what the standard library wrote before it, or
every stored row with that value would be rewritten once, and a refresh that changed
nothing would write rows (DESIGN.md 5).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.persistence.canonical_json import canonical_json
from daemon.persistence.persister import Persister
from tests.inventory_builders import MANAGER, Cloud, pages


def standard(value: Any) -> str:
    """What refreshd stored before orjson (and must keep storing)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=25
)


@settings(max_examples=600)
@given(values)
def test_same_text_as_the_standard_library(value: Any) -> None:
    assert canonical_json(value) == standard(value)


def test_same_text_for_values_orjson_spells_differently() -> None:
    tricky = {
        "small": [1e-5, 5e-05, -3.4e-06, 1e-7, 1.5e-9, 1e-10, 0.0001, 0.00012],
        "large": [1e16, 1.5e300, 12345678901234567.0, 2**63, 2**64, -(2**70)],
        "text": ["é", "日本", "\u2028", "a\x00b", "</script>", "\ud800"],
        "keys": {"b": 1, "a": {"d": [], "c": {}}, "": None},
        "when": datetime(2026, 12, 2, 13, 0, tzinfo=UTC),
    }
    assert canonical_json(tricky) == standard(tricky)
    assert canonical_json({2: "int", 1: [None]}) == standard({2: "int", 1: [None]})


async def test_values_saved_twice_write_nothing(persister: Persister) -> None:
    """End to end, on both backends: rows whose JSON holds what orjson spells its own way
    (non-ASCII text, tiny floats, big integers, nested keys in any order) are saved once."""
    cloud = Cloud().flavor("f1").image("img1")
    tags = {"owner": "José", "ratio": 5e-05, "big": 2**65, "nested": {"z": 1, "a": [1e-7]}}
    cloud.vm("a", tags=tags, extra={"note": "日本", "load": 0.25})
    first = await persister.save(MANAGER, pages(*cloud.full_pages()))
    assert first.counts["vms"].created == 1

    again = await persister.save(MANAGER, pages(*cloud.full_pages()))
    assert again.details() == {}
    cloud.vm(
        "a",
        tags={"nested": {"a": [1e-7], "z": 1}, "big": 2**65, "ratio": 5e-05, "owner": "José"},
        extra={"load": 0.25, "note": "日本"},
    )
    assert (await persister.save(MANAGER, pages(*cloud.full_pages()))).details() == {}
