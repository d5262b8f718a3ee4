"""Secure by default: an HTTP endpoint reachable from other hosts needs a token.

``refreshd check-config`` and ``refreshd run`` refuse a non-loopback ``[http] listen``
without ``[http] token`` unless ``allow_unauthenticated = true``; the message names
the keys.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from daemon.service.cli import main
from tests.daemon_process import REFRESHD, free_port, write_config


def config(tmp_path: Path, http: dict[str, Any]) -> Path:
    return write_config(
        tmp_path / "refreshd.toml",
        {
            "database_url": f"sqlite:///{tmp_path / 'r.db'}",
            "http": http,
            "managers": [{"name": "a", "provider": "awesome_cloud", "endpoint": "embedded"}],
        },
    )


@pytest.mark.parametrize("listen", ["0.0.0.0:{port}", "[::]:{port}", "10.1.2.3:{port}"])
def test_an_open_listen_without_token_is_refused_with_the_keys_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str
) -> None:
    path = config(tmp_path, {"listen": listen.format(port=free_port())})
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert "[http] token" in err and "allow_unauthenticated = true" in err


def test_refreshd_run_refuses_to_start(tmp_path: Path) -> None:
    path = config(tmp_path, {"listen": f"0.0.0.0:{free_port()}"})
    done = subprocess.run(
        [REFRESHD, "run", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "allow_unauthenticated" in done.stderr
    assert not (tmp_path / "r.db").exists()  # refused before opening anything


@pytest.mark.parametrize(
    "http",
    [
        {"listen": "127.0.0.1:8080"},
        {"listen": "localhost:8080"},
        {"listen": "[::1]:8080"},
        {"listen": "0.0.0.0:8080", "token": {"value": "s3cret"}},
        {"listen": "0.0.0.0:8080", "allow_unauthenticated": True},
    ],
)
def test_loopback_a_token_or_an_explicit_opt_out_is_accepted(
    tmp_path: Path, http: dict[str, Any]
) -> None:
    assert main(["check-config", "--config", str(config(tmp_path, http))]) == 0
