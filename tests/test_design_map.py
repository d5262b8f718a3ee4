"""docs/design.md's map names every module of daemon/, catchers/ and providers/, and no other."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from module_map import modules  # noqa: E402


def test_the_design_map_lists_exactly_the_modules_that_exist() -> None:
    page = (ROOT / "docs" / "design.md").read_text()
    listed = set(re.findall(r"^\| `((?:daemon|catchers|providers)/[\w/]+\.py)` \|", page, re.M))
    present = {str(p) for p in modules()}
    assert not present - listed, f"missing from docs/design.md: {sorted(present - listed)}"
    assert not listed - present, f"gone but still in docs/design.md: {sorted(listed - present)}"


def test_every_module_says_what_it_holds() -> None:
    silent = [str(p) for p in modules() if p.name != "__init__.py" and not _has_doc(p)]
    assert not silent, f"modules without a docstring: {silent}"


def _has_doc(rel: Path) -> bool:
    import ast

    return bool(ast.get_docstring(ast.parse((ROOT / rel).read_text())))
