"""Print the module map of docs/design.md: one line per module, from its docstring.

Usage: ``python scripts/module_map.py`` prints the Markdown table of docs/design.md's
"The map" section; ``--write`` puts it in the page, between the ``<!-- map -->``
markers (run it after moving, adding or re-describing a module).
tests/test_design_map.py checks that the page names every module and no module
that is gone.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "catchers", "providers")


def modules(root: Path = ROOT) -> Iterator[Path]:
    """Every Python module of the shipped packages, migrations' versions aside."""
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            if "versions" in rel.parts or (path.name == "__init__.py" and not _docstring(path)):
                continue
            yield rel


def _docstring(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    return (doc or "").strip()


def summary(path: Path) -> str:
    """The docstring's first sentence, on one line."""
    first = _docstring(path).split("\n\n")[0].replace("\n", " ")
    return first.replace("|", "\\|")


def table(root: Path = ROOT) -> str:
    lines = ["| module | holds |", "|---|---|"]
    lines += [f"| `{rel}` | {summary(root / rel)} |" for rel in modules(root)]
    return "\n".join(lines)


def write(page: Path = ROOT / "docs" / "design.md") -> None:
    """Replace the table between the page's ``<!-- map -->`` and ``<!-- /map -->``."""
    text = page.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    if BEGIN not in text or END not in rest:
        raise SystemExit(f"{page}: no {BEGIN} ... {END} markers")
    page.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


BEGIN, END = "<!-- map -->", "<!-- /map -->"

if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        sys.stdout.write(table() + "\n")
