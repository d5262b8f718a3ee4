"""The children of bench/soak.py: a private Tansu broker, a private PostgreSQL cluster, the
simulator (churn, Kafka delivery) and `refreshd run`; started, probed and stopped (bounded).

Flow: simulator -> Tansu broker -> `refreshd run` -> private PostgreSQL (**soak_children**).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from kafka_topics import create_topic
from processes import free_port, http_ok, poll, stop_process
from simulator import simulator_command
from sqlalchemy.exc import SQLAlchemyError

from tests.daemon_process import DaemonProcess, write_config
from tests.fixtures.kafka_broker import PrivateBroker, private_broker
from tests.fixtures.private_postgres import PrivateCluster, _bindir
from tests.scaleout_cluster import CATCHER_OPTIONS as TANSU_CATCHER_OPTIONS

MANAGER = "awesome"
TOPIC = "soak-events"
GROUP = "refreshd-soak"
CATCHER_OPTIONS = {**TANSU_CATCHER_OPTIONS, "stall_timeout": "20s"}
"""As the end-to-end tests run the Kafka catcher against Tansu, and a stall timeout."""


async def eventually(condition: Callable[[], Any], timeout: float, interval: float = 0.5) -> bool:
    """Poll ``condition`` (sync or async) until truthy; False after ``timeout`` seconds.
    A child being down (connection refused, timeout, database error) counts as False."""
    errors = (TimeoutError, aiohttp.ClientError, OSError, SQLAlchemyError)
    return bool(await poll(condition, timeout, interval, tolerate=errors))


class SoakChildren:
    """The children of one soak run, with their logs in ``work``."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.broker: PrivateBroker | None = None
        self.pg: PrivateCluster | None = None
        self.simulator: subprocess.Popen[bytes] | None = None
        self.daemon: DaemonProcess | None = None
        self.sim_url = ""

    async def start(self) -> None:
        self.broker = await asyncio.to_thread(private_broker, self.work)
        bindir = _bindir()
        if bindir is None:
            raise SystemExit("the PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        datadir = self.work / "pgdata"
        datadir.mkdir()
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: its files go to postgres
            user = pwd.getpwnam("postgres")
            for path in (self.work, datadir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.pg = PrivateCluster(bindir, datadir, free_port())
        await asyncio.to_thread(self.pg.init)
        await asyncio.to_thread(self.pg.start)
        await asyncio.to_thread(self.pg.create_database)
        await create_topic(self.broker.bootstrap, TOPIC, 1)

        sim_port = free_port()
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        with (self.work / "simulator.log").open("ab") as log:
            self.simulator = subprocess.Popen(
                simulator_command(
                    sim_port,
                    self.args.vms,
                    seed=self.args.seed,
                    bootstrap=self.broker.bootstrap,
                    topic=TOPIC,
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not await eventually(lambda: http_ok(self.sim_url + "/healthz"), 60, 0.2):
            raise RuntimeError(f"the simulator did not start; see {self.work}/simulator.log")

        http_port = free_port()
        config = write_config(
            self.work / "refreshd.toml",
            {
                "database_url": self.pg.url,
                "status_interval": "30s",
                "shutdown_timeout": "10s",
                "http": {"listen": f"127.0.0.1:{http_port}"},
                "batching": {"debounce": "50ms", "max_delay": "500ms"},
                "managers": [
                    {
                        "name": MANAGER,
                        "provider": "awesome_cloud",
                        "endpoint": self.sim_url,
                        "refresh_interval": "24h",  # only the events can converge the database
                    }
                ],
                "catchers": [
                    {
                        "type": "kafka",
                        "name": "soak",
                        "bootstrap_servers": self.broker.bootstrap,
                        "topics": [TOPIC],
                        "group_id": GROUP,
                        "manager": MANAGER,
                        **CATCHER_OPTIONS,
                    }
                ],
            },
        )
        self.daemon = DaemonProcess(
            config, http_port=http_port, log_path=self.work / "refreshd.log"
        )
        await self.start_daemon()

    async def start_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.start()
        if not await eventually(self.ready, self.args.recover_timeout, 0.2):
            raise RuntimeError(f"refreshd was not ready in time; see {self.daemon.log_path}")

    async def ready(self) -> bool:
        assert self.daemon is not None
        if not self.daemon.alive():
            return False
        return await http_ok(self.daemon.url + "/readyz")

    async def healthy(self) -> bool:
        assert self.daemon is not None
        return await self.ready() and await http_ok(self.daemon.url + "/healthz")

    def stop_all(self) -> None:
        """Every child, each wait bounded; the private cluster's data is removed, logs kept."""
        if self.daemon is not None and self.daemon.alive():
            started = time.monotonic()
            self.daemon.signal(signal.SIGTERM)
            try:
                code = self.daemon.wait(30)
                print(
                    f"daemon stopped on SIGTERM in {time.monotonic() - started:.1f}s "
                    f"(exit status {code})"
                )
            except subprocess.TimeoutExpired:
                print("daemon did not stop within 30s of SIGTERM: killed")
                self.daemon.signal(signal.SIGKILL)
                self.daemon.wait(10)
        if self.daemon is not None:
            log = self.daemon.log()
            print(
                f"daemon log: {log.count(' ERROR ')} ERROR lines, "
                f"{log.count('Traceback')} logged tracebacks ({self.daemon.log_path})"
            )
        if self.simulator is not None:
            stop_process(self.simulator, 15)
        if self.broker is not None:
            self.broker.stop()  # SIGCONT first when paused
        if self.pg is not None:
            with contextlib.suppress(subprocess.SubprocessError):  # already stopped
                self.pg.stop()
            shutil.rmtree(self.pg.datadir, ignore_errors=True)
