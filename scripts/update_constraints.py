"""Write deploy/constraints.txt: the exact versions of refreshd's runtime dependencies.

Run in a virtualenv where refreshd is installed with the extras a service uses
(``pip install -e '.[postgres,aws]'``, as ``make test`` does) and the tests pass:

    .venv/bin/python scripts/update_constraints.py

The file pins the whole closure of ``refreshd[postgres,aws]`` (not the test or dev
tools), so a service install is what the tests ran with:

    pip install -c constraints.txt 'refreshd[postgres]'
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
SERVICE_EXTRAS = ("postgres", "aws")


def runtime_closure(
    project: str = "refreshd", extras: Iterable[str] = SERVICE_EXTRAS
) -> dict[str, str]:
    """``{canonical name: installed version}`` of every distribution ``project[extras]``
    needs at run time (environment markers evaluated for this interpreter)."""
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(project, frozenset(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (canonicalize_name(name), wanted) in seen:
            continue
        seen.add((canonicalize_name(name), wanted))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name} is not installed: install refreshd with its extras") from None
        key = canonicalize_name(dist.metadata["Name"])
        if key != canonicalize_name(project):
            found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                if canonicalize_name(req.name) == canonicalize_name(project):
                    continue  # refreshd[x] pulling another extra of itself: already wanted
                todo.append((req.name, frozenset(req.extras)))
    return dict(sorted(found.items()))


def render(pins: dict[str, str]) -> str:
    header = (
        "# Exact versions of refreshd's runtime dependencies (refreshd[postgres,aws]) that the\n"
        "# test suite ran with; for service installs:\n"
        "#   pip install -c constraints.txt 'refreshd[postgres]'\n"
        "# Regenerate with scripts/update_constraints.py after changing dependencies.\n"
    )
    return header + "".join(f"{name}=={version}\n" for name, version in pins.items())


def main() -> int:
    CONSTRAINTS.write_text(render(runtime_closure()))
    print(f"wrote {CONSTRAINTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
