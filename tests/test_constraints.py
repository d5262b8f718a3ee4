"""deploy/constraints.txt: a service install gets exactly the tested versions."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from importlib.metadata import distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
sys.path.insert(0, str(ROOT / "scripts"))
from update_constraints import runtime_closure  # noqa: E402


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line!r}: constraints pin exact versions"
            out[canonicalize_name(name)] = version
    return out


def test_constraints_pin_every_runtime_dependency_consistently() -> None:
    pinned = pins()
    closure = runtime_closure()
    assert set(closure) <= set(pinned), f"not pinned: {sorted(set(closure) - set(pinned))}"
    # no test or dev tool in a service install
    assert not {"pytest", "ruff", "mypy", "selenium", "moto"} & set(pinned)
    # every pin satisfies what refreshd and the pinned packages ask for
    for name in ["refreshd", *closure]:
        for line in distribution(name).requires or []:
            req = Requirement(line)
            target = canonicalize_name(req.name)
            if target in pinned:
                assert req.specifier.contains(pinned[target], prereleases=True), (
                    f"{name} needs {req}, constraints pin {pinned[target]}"
                )


@pytest.mark.slow
def test_a_service_install_resolves_to_the_pinned_versions(tmp_path: Path) -> None:
    """pip, in a fresh virtualenv, resolves refreshd[postgres,aws] with the constraints
    (a dry run: nothing is installed) to exactly the pinned versions."""
    venv.create(tmp_path / "venv", with_pip=True)
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            str(tmp_path / "venv" / "bin" / "pip"),
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            "-c",
            str(CONSTRAINTS),
            f"{ROOT}[postgres,aws]",
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    chosen = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    chosen.pop("refreshd")
    pinned = pins()
    assert chosen == {name: pinned[name] for name in chosen}
    assert set(chosen) == set(runtime_closure())
