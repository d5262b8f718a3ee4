"""The CLI as an operator meets it: --version, --help, log options anywhere, refresh --json,
and log lines (text, JSON, under journald) as a service writes them."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.service.cli import main
from daemon.service.logging_setup import LogFormat, configure_logging
from daemon.service.version import refreshd_version
from tests.daemon_process import REFRESHD
from tests.test_config_cli import embedded


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"refreshd {refreshd_version()}"


def test_help_has_a_headline_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "refreshd: keep a relational copy of cloud inventory fresh" in out
    assert "examples:" in out and "The ``refreshd`` command line" not in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "warning", "check-config", "--config", "{cfg}"],
        ["check-config", "--config", "{cfg}", "--log-level", "warning"],
    ],
)
def test_log_level_before_or_after_the_subcommand(tmp_path: Path, argv: list[str]) -> None:
    cfg = str(embedded(tmp_path))
    assert main([a.replace("{cfg}", cfg) for a in argv]) == 0
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("alembic").level == logging.WARNING


def test_bad_log_level_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check-config", "--config", str(embedded(tmp_path)), "--log-level", "loud"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'loud'" in err and "Traceback" not in err


def test_refresh_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(embedded(tmp_path))
    assert main(["refresh", "--config", cfg, "--manager", "awesome", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["manager"] == "awesome" and result["kind"] == "full"
    assert result["trigger"] == "manual"
    assert result["collections"]["vms"]["created"] == 30
    assert result["rows_written"] == sum(result["total"].values()) > 30


def run_cli(args: list[str], stderr: Path, env: dict[str, str] | None = None) -> int:
    with stderr.open("w") as err:
        return subprocess.run(
            [REFRESHD, *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **(env or {})},
            timeout=120,
        ).returncode


def test_json_logs_one_object_per_line_without_library_noise(tmp_path: Path) -> None:
    cfg = str(embedded(tmp_path))
    err = tmp_path / "stderr"
    assert (
        run_cli(["refresh", "--config", cfg, "--manager", "awesome", "--log-format", "json"], err)
        == 0
    )
    lines = err.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any("full refresh saved" in e["message"] for e in events)
    assert all(e["level"] in ("info", "warning", "error") for e in events)
    assert not any(e["logger"].startswith("alembic") for e in events)  # no migration chatter
    assert all(set(e) >= {"time", "level", "logger", "message"} for e in events)


def test_text_logs_under_journald_have_no_timestamp_but_a_priority(tmp_path: Path) -> None:
    cfg = str(embedded(tmp_path))
    err = tmp_path / "stderr"
    err.touch()
    st = os.stat(err)
    # $JOURNAL_STREAM names the stream stderr is (here: this file, as systemd would the socket)
    journal = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    assert run_cli(["refresh", "--config", cfg, "--manager", "awesome"], err, journal) == 0
    lines = err.read_text().splitlines()
    assert lines and all(re.match(r"<[0-7]>(INFO|WARNING|ERROR) \S+: ", line) for line in lines)
    # elsewhere: a timestamp first
    assert run_cli(["refresh", "--config", cfg, "--manager", "awesome"], err) == 0
    lines = err.read_text().splitlines()
    assert lines and all(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ", line) for line in lines
    )


def test_a_traceback_stays_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="info", fmt=LogFormat.TEXT, stream=sys.stderr)
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        logging.getLogger("refreshd.test").exception("it broke")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it broke" in err and "second line" in err


def test_the_demo_refuses_a_database_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "production.db"
    monkeypatch.setenv("REFRESHD_DATABASE_URL", f"sqlite:///{db}")
    for command in (["run"], ["refresh", "--manager", "awesome"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "embedded demo" in err and "--demo-into-database" in err
    assert not db.exists()  # nothing was written
    # asked explicitly: the demo refreshes into that database
    assert main(["refresh", "--manager", "awesome", "--demo-into-database", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["collections"]["vms"]["created"] >= 1000
    assert db.exists()
