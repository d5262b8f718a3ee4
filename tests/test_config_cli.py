"""The config file and the CLI, as an operator meets them: messages, exit codes, summaries."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from daemon.persistence.migrate import head_revision
from daemon.service.cli import main
from daemon.service.config import ConfigError, load_config, parse_config
from daemon.service.secrets import SecretUnavailableError
from tests.daemon_process import write_config

ROOT = Path(__file__).resolve().parent.parent


def embedded(tmp_path: Path, **manager: object) -> Path:
    return write_config(
        tmp_path / "refreshd.toml",
        {
            "database_url": f"sqlite:///{tmp_path / 'r.db'}",
            "managers": [
                {
                    "name": "awesome",
                    "provider": "awesome_cloud",
                    "endpoint": "embedded",
                    "embedded_vms": 30,
                    **manager,
                }
            ],
        },
    )


def test_example_config_in_deploy_is_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the credentials the unit loads (LoadCredential=), the example config passes;
    without them check-config names every missing one at once."""
    unit = (ROOT / "deploy" / "refreshd.service").read_text()
    names = [
        line.split("=", 1)[1].split(":", 1)[0]
        for line in unit.splitlines()
        if line.startswith("LoadCredential=")
    ]
    assert names
    monkeypatch.delenv("REFRESHD_DATABASE_URL", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = str(ROOT / "deploy" / "refreshd.toml")
    assert main(["check-config", "--config", config]) == 2
    err = capsys.readouterr().err
    for name in names:
        assert f"systemd credential {name}" in err
    for name in names:
        (tmp_path / name).write_text(
            "postgresql://refreshd:pw@db/refreshd\n" if name == "database-url" else "s3cret\n"
        )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert main(["check-config", "--config", config]) == 0
    assert "OK" in capsys.readouterr().out
    assert "CHANGE-ME" not in (ROOT / "deploy" / "refreshd.toml").read_text()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('databse_url = "x"\n', "databse_url: Extra inputs are not permitted"),
        ('[batching]\ndebounce = "soon"\n', "batching.debounce"),
        ("[batching]\nworkers = 0\n", "batching.workers"),
        ('[[managers]]\nname = "a"\nprovider = "nope"\n', "managers[0].provider: unknown provider"),
        (
            '[[managers]]\nname = "a"\nprovider = "awesome_cloud"\nendpoint = "embedded"\n'
            "page_size = 0\n",
            "managers[0].page_size",
        ),
        (
            '[[managers]]\nname = "a"\nprovider = "awesome_cloud"\nendpoint = "embedded"\n'
            '[[managers]]\nname = "a"\nprovider = "awesome_cloud"\nendpoint = "embedded"\n',
            "used twice",
        ),
        (
            '[[managers]]\nname = "a"\nprovider = "awesome_cloud"\nendpoint = "embedded"\n'
            '[[catchers]]\ntype = "webhook"\nmanager = "a"\nmax_wiat = 3\n',
            "catchers[0]",
        ),
        ('[[catchers]]\ntype = "carrier-pigeon"\n', "unknown catcher type"),
        ("this is = not toml = at all\n", "invalid TOML"),
    ],
)
def test_bad_config_names_the_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert message in err


def test_a_global_batching_key_in_a_manager_override_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``workers`` and ``max_pending_targets`` apply to all managers: in a manager's own
    ``[managers.batching]`` they would be silently ignored, so they are an error naming
    the key and the manager (the rest of that table is fine)."""
    manager = {"name": "aws-prod", "provider": "awesome_cloud", "endpoint": "embedded"}
    with pytest.raises(ConfigError) as raised:
        parse_config(
            {"managers": [manager | {"batching": {"workers": 8, "debounce": 0.5}}]},
            source="refreshd.toml",
        )
    assert str(raised.value) == (
        "refreshd.toml: managers[0].batching.workers: workers is global (refreshes running at "
        "once across all managers), not per manager: set it in [batching], not in manager "
        "'aws-prod''s [managers.batching]"
    )
    both = {"batching": {"workers": 8, "max_pending_targets": 10}}
    with pytest.raises(ConfigError) as raised:
        parse_config({"managers": [manager | both]}, source="refreshd.toml")
    assert "managers[0].batching.max_pending_targets: max_pending_targets is global" in str(
        raised.value
    )
    # in [batching] they are what they always were; other keys may be overridden per manager
    loaded = parse_config(
        {"batching": {"workers": 8}, "managers": [manager | {"batching": {"debounce": 0.5}}]}
    )
    assert loaded.config.batching.workers == 8

    path = tmp_path / "refreshd.toml"
    path.write_text(
        '[[managers]]\nname = "aws-prod"\nprovider = "awesome_cloud"\nendpoint = "embedded"\n'
        "[managers.batching]\nworkers = 8\n"
    )
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: managers[0].batching.workers: workers is global" in err
    assert "manager 'aws-prod'" in err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_durations_secrets_and_database_url_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("REFRESHD_DATABASE_URL", "postgresql://u@db/refreshd")
    monkeypatch.setenv("TOKEN_FROM_ENV", "from-env")
    loaded = parse_config(
        {
            "shutdown_timeout": "2m",
            "batching": {"debounce": "250ms", "max_delay": 3},
            "http": {"token": {"file": str(secret)}},
        }
    )
    cfg = loaded.config
    assert cfg.database_url == "postgresql://u@db/refreshd"
    assert cfg.shutdown_timeout == 120
    assert cfg.batching.debounce == 0.25 and cfg.batching.max_delay == 3
    assert cfg.http.token is not None and cfg.http.token.reveal() == "s3cret"
    env = parse_config({"http": {"token": {"env": "TOKEN_FROM_ENV"}}}).config.http.token
    assert env is not None and env.reveal() == "from-env"
    with pytest.raises(SecretUnavailableError, match="NOT_SET_ANYWHERE"):
        missing = parse_config({"http": {"token": {"env": "NOT_SET_ANYWHERE"}}}).config.http.token
        assert missing is not None
        missing.reveal()


def test_embedded_default_is_valid() -> None:
    loaded = load_config(None)
    assert [m.name for m in loaded.config.managers] == ["awesome"]
    assert [c.type for c in loaded.config.catchers] == ["inprocess"]
    assert loaded.config.database_url.startswith("sqlite")


def vms_in(db: Path) -> dict[str, str | None]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT ems_ref, archived_at FROM vms").fetchall())


def test_refresh_full_then_targeted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(embedded(tmp_path))
    assert main(["refresh", "--config", config, "--manager", "awesome"]) == 0
    out = capsys.readouterr().out
    assert "vms " in out and "created=30" in out
    assert "awesome: full refresh" in out
    assert len(vms_in(tmp_path / "r.db")) == 30

    # the same cloud again: nothing to write
    assert main(["refresh", "--config", config, "--manager", "awesome"]) == 0
    assert "0 row(s) written" in capsys.readouterr().out

    # a targeted refresh of a ref the database has never seen and the cloud does not have
    code = main(
        [
            "refresh",
            "--config",
            config,
            "--manager",
            "awesome",
            "--target",
            "vms:vm-999999",
            "--target",
            "vms:vm-000001",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "targeted refresh of 2 target(s)" in out
    assert "vm-999999" not in vms_in(tmp_path / "r.db")

    runs = (
        sqlite3.connect(tmp_path / "r.db")
        .execute("SELECT kind, error FROM refresh_runs ORDER BY id")
        .fetchall()
    )
    assert runs == [("full", None), ("full", None), ("targeted", None)]


def test_refresh_without_targeted_refresh_is_full(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(embedded(tmp_path, allow_targeted_refresh=False))
    assert (
        main(["refresh", "--config", config, "--manager", "awesome", "--target", "vms:vm-000001"])
        == 0
    )
    assert "awesome: full refresh" in capsys.readouterr().out


def test_refresh_holds_a_mass_deletion_until_confirmed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["refresh", "--config", str(embedded(tmp_path)), "--manager", "awesome"]) == 0
    capsys.readouterr()
    config = str(embedded(tmp_path, embedded_vms=5))  # the same cloud, 25 of 30 vms gone

    assert main(["refresh", "--config", config, "--manager", "awesome"]) == 1
    captured = capsys.readouterr()
    assert "held back the deletions" in captured.err and "--confirm-deletions" in captured.err
    assert sum(archived is None for archived in vms_in(tmp_path / "r.db").values()) == 30

    confirm = ["refresh", "--config", config, "--manager", "awesome", "--confirm-deletions"]
    assert main(confirm) == 0
    assert sum(archived is None for archived in vms_in(tmp_path / "r.db").values()) == 5
    assert main([*confirm, "--target", "vms:vm-000001"]) == 2
    assert "applies to a full refresh" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--manager", "nobody"], "no manager named 'nobody'"),
        (["--manager", "awesome", "--target", "vms"], "expected COLLECTION:REF"),
        (["--manager", "awesome", "--target", "planets:p-1"], "unknown collection 'planets'"),
        (
            ["--manager", "awesome", "--target", "vm:x"],
            "--target 'vm:x': unknown collection 'vm' (flavors, images, ",
        ),
        (["--manager", "awesome", "--target", "disks:vm="], "expected key=value pairs"),
    ],
)
def test_refresh_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["refresh", "--config", str(embedded(tmp_path)), *args]) == 2
    assert message in capsys.readouterr().err


def test_db_upgrade_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(embedded(tmp_path))
    assert main(["db", "upgrade", "--config", config]) == 0
    assert main(["db", "upgrade", "--config", config]) == 0
    out = capsys.readouterr().out
    assert out.count(f"database schema at revision {head_revision()}") == 2
    tables = {
        r[0]
        for r in sqlite3.connect(tmp_path / "r.db").execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        )
    }
    assert {
        "managers",
        "vms",
        "images",
        "flavors",
        "security_groups",
        "disks",
        "network_ports",
        "vm_security_groups",
        "refresh_runs",
    } <= tables


def test_refresh_against_a_cloud_that_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(embedded(tmp_path, endpoint="http://127.0.0.1:9", retries=0))
    assert main(["refresh", "--config", config, "--manager", "awesome"]) == 1
    assert "refresh failed" in capsys.readouterr().err
    with sqlite3.connect(tmp_path / "r.db") as conn:
        error = conn.execute("SELECT last_refresh_error FROM managers").fetchone()[0]
        assert error
        assert (
            conn.execute("SELECT count(*) FROM refresh_runs WHERE error IS NOT NULL").fetchone()[0]
            == 1
        )


def test_a_plugin_whose_extra_is_missing_names_the_extra() -> None:
    from importlib.metadata import EntryPoint

    from daemon.model.provider import PluginUnavailableError, load_entry_point

    entry = EntryPoint("sqs", "aiobotocore.not_installed_here:create", "refreshd.catchers")
    with pytest.raises(PluginUnavailableError, match=r"pip install 'refreshd\[aws\]'"):
        load_entry_point(entry, "catcher type")
    entry = EntryPoint("x", "no_such_module_anywhere:create", "refreshd.catchers")
    with pytest.raises(PluginUnavailableError, match="catcher type 'x' cannot be loaded"):
        load_entry_point(entry, "catcher type")
