"""docs/plugins.md's worked example is a provider that works: its code blocks are copied
into a package, installed through a real entry point (a ``.dist-info`` on PYTHONPATH), and
``refreshd check-config`` and full and targeted ``refreshd refresh`` run against it."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_process import write_config

ROOT = Path(__file__).resolve().parent.parent
REFRESHD = Path(sys.executable).with_name("refreshd")


def install_example(site: Path) -> None:
    """The ``# tinycloud/...`` blocks of docs/plugins.md as a package, plus its entry point."""
    page = (ROOT / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"```python\n# (tinycloud/\w+\.py)\n(.*?)```", page, re.S)
    assert {name for name, _ in blocks} == {
        f"tinycloud/{m}.py" for m in ("__init__", "settings", "parser", "collector", "events")
    }
    for name, code in blocks:
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(code)
    info = site / "tinycloud-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinycloud\nVersion: 0.1\n")
    entry_section = r'```toml\n(\[project.entry-points."refreshd.providers"\]\n.*?)```'
    toml = re.search(entry_section, page, re.S)
    assert toml is not None
    section, entry = toml.group(1).strip().splitlines()
    assert section == '[project.entry-points."refreshd.providers"]'
    (info / "entry_points.txt").write_text("[refreshd.providers]\n" + entry.replace('"', "") + "\n")


def refreshd(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("REFRESHD_DATABASE_URL", None)
    return subprocess.run(
        [str(REFRESHD), *args], capture_output=True, text=True, env=env, timeout=120
    )


def vms(db: Path) -> dict[str, tuple[str | None, bool]]:
    """ems_ref -> (name, archived) of the stored vms."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT ems_ref, name, archived_at IS NOT NULL FROM vms").fetchall()
    return {ref: (name, bool(archived)) for ref, name, archived in rows}


def test_the_documented_provider_is_found_configured_and_refreshed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_example(site)
    inventory = tmp_path / "inventory.json"
    cloud = {
        "vms": [
            {"id": "vm-1", "name": "web", "state": "running", "tags": {"env": "prod"}},
            {"id": "vm-2", "name": "db", "state": "stopped"},
            {"name": "no id"},
        ]
    }
    inventory.write_text(json.dumps(cloud))
    db = tmp_path / "tiny.db"
    manager = {"name": "tiny", "provider": "tinycloud", "inventory": str(inventory)}
    cfg = write_config(
        tmp_path / "refreshd.toml", {"database_url": f"sqlite:///{db}", "managers": [manager]}
    )

    checked = refreshd(site, "check-config", "--config", str(cfg))
    assert checked.returncode == 0, checked.stderr
    # the provider's settings model validates its keys
    bad = write_config(
        tmp_path / "bad.toml",
        {"database_url": f"sqlite:///{db}", "managers": [{**manager, "inventroy": "x"}]},
    )
    refused = refreshd(site, "check-config", "--config", str(bad))
    assert refused.returncode == 2 and "inventroy" in refused.stderr

    full = refreshd(site, "refresh", "--config", str(cfg), "--manager", "tiny", "--json")
    assert full.returncode == 0, full.stderr
    assert vms(db) == {"vm-1": ("web", False), "vm-2": ("db", False)}
    with sqlite3.connect(db) as conn:  # the object without an id is kept as a rejection
        assert conn.execute("SELECT reason FROM rejected_objects").fetchall() == [("parse_error",)]

    cloud["vms"] = [{"id": "vm-1", "name": "web-2", "state": "running"}]
    inventory.write_text(json.dumps(cloud))
    targeted = refreshd(
        site, "refresh", "--config", str(cfg), "--manager", "tiny",
        "--target", "vms:vm-1", "--target", "vms:vm-2",
    )  # fmt: skip
    assert targeted.returncode == 0, targeted.stderr
    assert vms(db) == {"vm-1": ("web-2", False), "vm-2": ("db", True)}

    # the provider's event mapping, as a catcher calls it
    monkeypatch.syspath_prepend(str(site))
    from tinycloud import provider  # type: ignore[import-not-found]

    event = {"id": "e1", "type": "tinycloud.vm.changed", "data": {"id": "vm-1"}}
    assert [str(t) for t in provider.map_event("tiny", event)] == ["tiny:vms:vm-1"]
    assert provider.map_event("tiny", {"type": "tinycloud.region.announced"}) == []
    with pytest.raises(ValueError, match=r"without data\.id"):
        provider.map_event("tiny", {"type": "tinycloud.vm.changed", "data": {}})
