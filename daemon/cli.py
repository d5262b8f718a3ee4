"""The ``refreshd`` command line.

Flow: operator -> **cli** -> config -> (run | refresh | db upgrade | simulator | check-config).

Exit codes: 0 success, 1 the operation failed (refresh error; or the mass-deletion
guard held the deletions back: the rest was saved, ``--confirm-deletions`` applies them),
2 bad usage or configuration (the message names the file and key).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from aiohttp import web
from pydantic import ValidationError

from daemon.batcher import Batcher
from daemon.catcher import (
    CatcherContext,
    ManagerEndpoint,
    UnknownPluginError,
    load_catcher,
    load_event_mapper,
)
from daemon.config import ConfigError, LoadedConfig, format_validation_error, load_config
from daemon.db import DatabaseURLError, create_engine
from daemon.inventory import COLLECTIONS
from daemon.lifecycle import Daemon
from daemon.migrate import upgrade
from daemon.persister import Persister
from daemon.provider import load_provider
from daemon.refresh_result import PersisterSettings
from daemon.refresher import RefreshableManager, Refresher
from daemon.targets import Ref, Target, TargetCollection

log = logging.getLogger("refreshd")


class UsageError(ValueError):
    pass


def parse_target(manager: str, spec: str) -> Target:
    """``vms:vm-12`` or ``disks:vm=vm-12,device_name=sda`` -> a Target of ``manager``."""
    collection, sep, ref = spec.partition(":")
    if not sep or not ref:
        raise UsageError(f"--target {spec!r}: expected COLLECTION:REF, e.g. vms:vm-000012")
    if collection not in COLLECTIONS:
        known = ", ".join(COLLECTIONS.save_order)
        raise UsageError(f"--target {spec!r}: unknown collection {collection!r} ({known})")
    if "=" in ref:
        pairs = [p.partition("=") for p in ref.split(",")]
        if any(not k or not v for k, _, v in pairs):
            raise UsageError(f"--target {spec!r}: expected key=value pairs after ':'")
        return Target(manager, collection, Ref({k: v for k, _, v in pairs}))
    return Target.of(manager, collection, ref)


def persister_settings(loaded: LoadedConfig) -> PersisterSettings:
    p = loaded.config.persister
    return PersisterSettings(
        max_delete_ratio=p.max_delete_ratio, mass_delete_min_rows=p.mass_delete_min_rows
    )


async def cmd_refresh(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    manager_cfg = loaded.config.manager(args.manager)
    targets = [parse_target(manager_cfg.name, t) for t in args.target or []]
    if args.confirm_deletions and targets:
        raise UsageError("--confirm-deletions applies to a full refresh: give no --target")
    collection = TargetCollection(manager_cfg.name, targets or [Target.full(manager_cfg.name)])
    engine = create_engine(loaded.config.database_url)
    try:
        await upgrade(engine)
        persister = Persister(engine, settings=persister_settings(loaded))
        if args.confirm_deletions:
            await persister.ensure_manager(manager_cfg.name, manager_cfg.provider)
            await persister.confirm_deletions(manager_cfg.name)
        provider = load_provider(manager_cfg.provider)
        connection = provider.connect(manager_cfg.name, loaded.provider_settings[manager_cfg.name])
        async with connection:
            managed = RefreshableManager(
                name=manager_cfg.name,
                provider=manager_cfg.provider,
                connection=connection,
                allow_targeted_refresh=manager_cfg.allow_targeted_refresh,
            )
            result = await Refresher(persister, {managed.name: managed}).refresh(collection)
        for line in result.summary_lines():
            print(line)
        if result.held_deletion is not None:
            print(f"refreshd: {result.held_deletion.message(manager_cfg.name)}", file=sys.stderr)
            return 1
        return 0
    finally:
        await engine.dispose()


async def cmd_run(loaded: LoadedConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT; a second signal exits at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info(
                "received %s: shutting down gracefully (again to exit at once)",
                signal.Signals(signum).name,
            )
            stop.set()
        else:
            log.warning("second signal: exiting at once; uncommitted events will be re-read")
            os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return await Daemon(loaded).run(stop)


async def cmd_db_upgrade(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    engine = create_engine(loaded.config.database_url)
    try:
        revision = await upgrade(engine)
    finally:
        await engine.dispose()
    print(f"database schema at revision {revision}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    cfg = loaded.config
    create_engine(cfg.database_url)  # validates the URL and the driver, no I/O
    check_catchers(loaded)
    print(f"{loaded.source}: OK ({len(cfg.managers)} manager(s), {len(cfg.catchers)} catcher(s))")
    return 0


def cmd_simulator(argv: Sequence[str]) -> int:
    """``refreshd simulator ...``: the provider parses its own options (see ``--help``)."""
    provider = load_provider("awesome_cloud")
    simulator_main = getattr(provider, "simulator_main", None)
    if simulator_main is None:
        raise UsageError("the installed awesome_cloud provider has no simulator")
    return int(simulator_main(list(argv)))


def check_catchers(loaded: LoadedConfig) -> None:
    """Build every configured catcher (constructors do no I/O) to validate its options."""
    cfg = loaded.config
    endpoints = {}
    for m in cfg.managers:
        try:
            mapper = load_event_mapper(m.provider)
        except UnknownPluginError:
            continue
        endpoints[m.name] = ManagerEndpoint(m.name, m.provider, mapper)

    async def never(_targets: TargetCollection) -> None:
        raise RuntimeError("check-config does not refresh")

    context = CatcherContext(
        sink=Batcher(never),
        managers=endpoints,
        clock=time.monotonic,
        http_app=web.Application(),
        token=None,
    )
    for i, c in enumerate(cfg.catchers):
        try:
            load_catcher(c.type)(c.options | ({"name": c.name} if c.name else {}), context)
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(loaded.source, exc, prefix=f"catchers[{i}]")
            ) from None
        except (ValueError, UnknownPluginError) as exc:
            raise ConfigError(f"{loaded.source}: catchers[{i}] ({c.type}): {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refreshd", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("refresh", help="refresh one manager now (full, or --target ...)")
    p.add_argument("--config", help="TOML config (default: the embedded default)")
    p.add_argument("--manager", required=True)
    p.add_argument(
        "--target",
        action="append",
        metavar="COLLECTION:REF",
        help="refresh only this object (repeatable), e.g. vms:vm-000012",
    )
    p.add_argument(
        "--confirm-deletions",
        action="store_true",
        help="full refresh that applies the deletions the mass-deletion guard would hold back",
    )

    db = sub.add_parser("db", help="database schema")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="apply migrations")
    up.add_argument("--config")

    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("--config", required=True)

    sub.add_parser(
        "simulator",
        help="run the AwesomeCloud simulator standalone (refreshd simulator --help)",
        add_help=False,
    )

    r = sub.add_parser("run", help="run the daemon (no --config: the embedded default)")
    r.add_argument("--config", help="TOML config (default: SQLite + embedded simulator)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulator"]:
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            return cmd_simulator(argv[1:])
        except UsageError as exc:
            print(f"refreshd: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "refresh":
            return asyncio.run(cmd_refresh(args))
        if args.command == "db":
            return asyncio.run(cmd_db_upgrade(args))
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "run":
            loaded = load_config(args.config)
            if args.log_level is None:
                logging.getLogger().setLevel(loaded.config.log_level.upper())
            return asyncio.run(cmd_run(loaded))
    except (ConfigError, UsageError, DatabaseURLError) as exc:
        print(f"refreshd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.debug("failed", exc_info=True)
        print(f"refreshd: {args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
