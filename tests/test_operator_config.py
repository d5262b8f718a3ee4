"""check-config finds what `run` would refuse, all at once; one secret mechanism for every
credential; run-time configuration errors exit 2."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.service.cli import main
from providers.awesome_cloud.simulator.cloud import Cloud
from providers.awesome_cloud.simulator.server import SimulatorServer
from tests.daemon_process import REFRESHD

KAFKA = (
    '[[managers]]\nname = "a"\nprovider = "awesome_cloud"\nendpoint = "embedded"\n'
    '[[catchers]]\ntype = "kafka"\nbootstrap_servers = "k:9092"\ntopics = "t"\n'
    'manager = "a"\ngroup_id = "g"\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n'
)
EMBEDDED = '[[managers]]\nname = "a"\nprovider = "awesome_cloud"\nendpoint = "embedded"\n'


def check(tmp_path: Path, toml: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "refreshd.toml"
    path.write_text(f'database_url = "sqlite:///{tmp_path / "r.db"}"\n' + toml)
    code = main(["check-config", "--config", str(path)])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[batching]\nretry_initial = "10m"\nretry_max = "1s"\n',
            "batching: retry_initial (600s) is longer than retry_max (1s)",
        ),
        (
            EMBEDDED + '[managers.batching]\nretry_initial = "10m"\n',
            "managers[0].batching: retry_initial (600s) is longer than retry_max (300s)",
        ),
        ('[http]\nlisten = "0.0.0.0"\n', "http.listen: Value error, expected HOST:PORT"),
        (
            '[http]\ntoken = { env = "REFRESHD_TEST_UNSET" }\n',
            "http.token: environment variable REFRESHD_TEST_UNSET is not set",
        ),
        (
            '[http]\ntoken = { file = "/nonexistent/token" }\n',
            "http.token: cannot read secret file /nonexistent/token",
        ),
        (
            '[http]\ntoken = { credential = "http-token" }\n',
            "http.token: systemd credential http-token: $CREDENTIALS_DIRECTORY is not set",
        ),
        (
            '[http]\ntoken = { env = "A", file = "/b" }\n',
            "give exactly one of value, env, file, credential",
        ),
        (
            EMBEDDED + 'token = { env = "REFRESHD_TEST_UNSET" }\n',
            "managers[0].token: environment variable REFRESHD_TEST_UNSET",
        ),
        (
            'databse_url = "x"\n',
            "databse_url: Extra inputs are not permitted (did you mean 'database_url'?)",
        ),
        (
            "[batching]\ndebounse = 1\n",
            "batching.debounse: Extra inputs are not permitted (did you mean 'debounce'?)",
        ),
        (
            EMBEDDED + "page_szie = 10\n",
            "managers[0].page_szie: Extra inputs are not permitted (did you mean 'page_size'?)",
        ),
        (EMBEDDED + "refresh_intervall = 10\n", "(did you mean 'refresh_interval'?)"),
        (
            KAFKA + 'sasl_password = { value = "p" }\n',
            "sasl_mechanism PLAIN needs sasl_username and sasl_password",
        ),
        (
            KAFKA + 'sasl_username = "u"\nsasl_password = { env = "REFRESHD_TEST_UNSET" }\n',
            "catchers[0].sasl_password: environment variable REFRESHD_TEST_UNSET is not set",
        ),
    ],
)
def test_check_config_refuses_what_run_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, message: str
) -> None:
    code, out = check(tmp_path, toml, capsys)
    assert code == 2, out
    assert message in out
    assert "Traceback" not in out


def test_every_problem_is_listed_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = check(
        tmp_path,
        '[http]\ntoken = { env = "REFRESHD_TEST_UNSET" }\n'
        + EMBEDDED
        + '[[catchers]]\ntype = "webhook"\nmanager = "a"\nmax_wiat = 3\n'
        + '[[catchers]]\ntype = "carrier-pigeon"\n'
        + '[[catchers]]\ntype = "inprocess"\nmanager = "nope"\n',
        capsys,
    )
    assert code == 2
    for expected in (
        "http.token: environment variable REFRESHD_TEST_UNSET",
        "catchers[0]",
        "catchers[1] (carrier-pigeon): unknown catcher type",
        "catchers[2] (inprocess): inprocess catcher: unknown manager 'nope'",
        "max_wiat: Extra inputs are not permitted (did you mean 'max_wait'?)",
    ):
        assert expected in out, out
    assert len(out.strip().splitlines()) >= 4


def test_provider_durations_take_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(
        tmp_path,
        EMBEDDED + 'request_timeout = "30s"\nbackoff_max = "1m"\nbackoff_initial = "200ms"\n',
        capsys,
    )
    assert code == 0, out


def test_a_missing_driver_names_the_extra(tmp_path: Path) -> None:
    """Without asyncpg (the postgres extra), check-config says what to install."""
    config = tmp_path / "refreshd.toml"
    config.write_text('database_url = "postgresql://u@db/refreshd"\n')
    script = (
        "import sys; sys.modules['asyncpg'] = None\n"  # as if the extra were not installed
        "from daemon.service.cli import main\n"
        f"sys.exit(main(['check-config', '--config', {str(config)!r}]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "REFRESHD_DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'refreshd[postgres]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_exits_2_on_a_configuration_error(tmp_path: Path) -> None:
    """systemd's RestartPreventExitStatus=2 then stops restarting it."""
    config = tmp_path / "refreshd.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path / "r.db"}"\n'
        '[http]\nlisten = "127.0.0.1:1"\ntoken = { credential = "http-token" }\n'
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CREDENTIALS_DIRECTORY", "REFRESHD_DATABASE_URL")
    }
    done = subprocess.run(
        [REFRESHD, "run", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2
    assert "http.token: systemd credential http-token" in done.stderr
    unit = (Path(__file__).resolve().parent.parent / "deploy" / "refreshd.service").read_text()
    assert "RestartPreventExitStatus=2" in unit


async def test_a_manager_token_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same secret forms work for a provider's token: the refresh authenticates."""
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "cloud-token").write_text("t0ken\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    async with SimulatorServer(Cloud.generate(vms=3, seed=1), token="t0ken") as server:
        config = tmp_path / "refreshd.toml"
        config.write_text(
            f'database_url = "sqlite:///{tmp_path / "r.db"}"\n'
            f'[[managers]]\nname = "a"\nprovider = "awesome_cloud"\nendpoint = "{server.url}"\n'
            'token = { credential = "cloud-token" }\n'
        )
        code = await asyncio.to_thread(
            main, ["refresh", "--config", str(config), "--manager", "a", "--json"]
        )
    assert code == 0, capsys.readouterr().err
    assert '"created": 3' in capsys.readouterr().out
