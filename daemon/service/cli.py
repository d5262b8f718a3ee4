"""The ``refreshd`` command line.

Flow: operator -> **cli** -> config -> (run | refresh | db upgrade | simulator | check-config).

Exit codes: 0 success, 1 the operation failed (refresh error; or the mass-deletion
guard held the deletions back: the rest was saved, ``--confirm-deletions`` applies them),
2 bad usage or configuration (the message names the file and key) -- also when
``run`` finds a configuration problem at start, so systemd does not restart it
(``RestartPreventExitStatus=2``).  ``--log-level`` and ``--log-format`` are
accepted before or after the subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from daemon.model.inventory import COLLECTIONS
from daemon.model.provider import EXTRA_OF_MODULE, load_provider
from daemon.model.targets import Ref, Target, TargetCollection, Trigger
from daemon.persistence.db import DatabaseURLError, create_engine, normalize_url
from daemon.persistence.migrate import upgrade
from daemon.persistence.persister import Persister
from daemon.persistence.refresh_result import RefreshResult, vars_of
from daemon.persistence.settings import PersisterSettings
from daemon.pipeline.refresher import RefreshableManager, Refresher
from daemon.service.config import DATABASE_URL_ENV, ConfigError, LoadedConfig, load_config
from daemon.service.lifecycle import SHUTDOWN_MARGIN, Daemon
from daemon.service.logging_setup import LEVELS, LogFormat, configure_logging
from daemon.service.preflight import config_problems
from daemon.service.secrets import SecretUnavailableError
from daemon.service.version import refreshd_version

log = logging.getLogger("refreshd")

HEADLINE = "refreshd: keep a relational copy of cloud inventory fresh from events and schedules"
EPILOG = """examples:
  refreshd run                                   the demo: SQLite + an embedded cloud
  refreshd check-config --config /etc/refreshd/refreshd.toml
  refreshd run --config /etc/refreshd/refreshd.toml --log-format json
  refreshd refresh --config refreshd.toml --manager aws-prod --target vms:i-0abc --json

docs: docs/operations.md (install, secrets, watch, upgrade)"""


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
        return Target(manager, collection, Ref({k: v for k, _, v in pairs}), trigger=Trigger.MANUAL)
    return Target.of(manager, collection, ref, trigger=Trigger.MANUAL)


def persister_settings(loaded: LoadedConfig) -> PersisterSettings:
    p = loaded.config.persister
    return PersisterSettings(
        max_delete_ratio=p.max_delete_ratio, mass_delete_min_rows=p.mass_delete_min_rows
    )


def refuse_demo_into_database(args: argparse.Namespace) -> None:
    """Without ``--config`` the embedded demo runs: a simulated cloud.  Writing its vms into
    the database ``REFRESHD_DATABASE_URL`` names (a real one, most likely) needs
    ``--demo-into-database``."""
    url = os.environ.get(DATABASE_URL_ENV)
    if args.config is None and url and not args.demo_into_database:
        where = normalize_url(url).render_as_string(hide_password=True)
        raise UsageError(
            f"without --config, {args.command} runs the embedded demo, whose simulated cloud "
            f"would be written into {where} ({DATABASE_URL_ENV}); give --config for your "
            "own managers, unset the variable for the demo's SQLite file, or add "
            "--demo-into-database to write the demo there anyway"
        )


async def cmd_refresh(args: argparse.Namespace) -> int:
    refuse_demo_into_database(args)
    loaded = load_config(args.config).usable()
    manager_cfg = loaded.config.manager(args.manager)
    targets = [parse_target(manager_cfg.name, t) for t in args.target or []]
    if args.confirm_deletions and targets:
        raise UsageError("--confirm-deletions applies to a full refresh: give no --target")
    collection = TargetCollection(
        manager_cfg.name, targets or [Target.full(manager_cfg.name, trigger=Trigger.MANUAL)]
    )
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
        if args.json:
            print(json.dumps(result_json(result), indent=2))
        else:
            for line in result.summary_lines():
                print(line)
        if result.held_deletion is not None:
            print(f"refreshd: {result.held_deletion.message(manager_cfg.name)}", file=sys.stderr)
            return 1
        return 0
    finally:
        await engine.dispose()


def result_json(result: RefreshResult) -> dict[str, object]:
    """``refresh --json``: what the refresh did, for scripts."""
    return {
        "manager": result.manager,
        "kind": result.kind.value,
        "trigger": result.trigger.value,
        "targets": result.targets,
        "started_at": result.started_at.isoformat(),
        "duration_seconds": round(result.duration, 6),
        "rows_written": result.rows_written,
        "total": vars_of(result.total),
        "collections": {name: vars_of(c) for name, c in result.counts.items()},
        "rejected": result.rejected_counts(),
        "held_deletion": (
            result.held_deletion.as_details() if result.held_deletion is not None else None
        ),
    }


async def cmd_run(loaded: LoadedConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT; a second signal exits at once, and so does the
    process when shutting down takes ``shutdown_timeout + SHUTDOWN_MARGIN + 5`` s."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[int] = []

    # the daemon bounds each shutdown step; this is the last resort if one still hangs
    overdue_after = loaded.config.shutdown_timeout + SHUTDOWN_MARGIN + 5.0

    def overdue() -> None:
        log.error(
            "shutdown still not done %.0fs after the signal: exiting at once; uncommitted"
            " events will be re-read",
            overdue_after,
        )
        os._exit(1)

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info(
                "received %s: shutting down gracefully (again to exit at once)",
                signal.Signals(signum).name,
            )
            stop.set()
            loop.call_later(overdue_after, overdue)
        else:
            log.warning("second signal: exiting at once; uncommitted events will be re-read")
            os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return await Daemon(loaded, freeze_heap=True).run(stop)


async def cmd_db_upgrade(args: argparse.Namespace) -> int:
    loaded = load_config(args.config).usable()
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
    preflight(loaded)
    print(f"{loaded.source}: OK ({len(cfg.managers)} manager(s), {len(cfg.catchers)} catcher(s))")
    return 0


def preflight(loaded: LoadedConfig) -> None:
    """Raise ConfigError listing everything ``run`` would refuse (all problems at once)."""
    problems = config_problems(loaded)
    if problems:
        raise ConfigError("\n".join(problems))


def cmd_simulator(argv: Sequence[str]) -> int:
    """``refreshd simulator ...``: the provider parses its own options (see ``--help``)."""
    provider = load_provider("awesome_cloud")
    simulator_main = getattr(provider, "simulator_main", None)
    if simulator_main is None:
        raise UsageError("the installed awesome_cloud provider has no simulator")
    return int(simulator_main(list(argv)))


DEMO_HELP = (
    "without --config: run the demo even though REFRESHD_DATABASE_URL names a database "
    "(its simulated inventory is written there)"
)


def _logging_options(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument(
        "--log-level",
        choices=LEVELS,
        default=default,
        help="log level (default: the config's log_level, else info)",
    )
    parser.add_argument(
        "--log-format",
        choices=[f.value for f in LogFormat],
        default=default,
        help="text (one line per event) or json (one object per line); default: the "
        "config's log_format, else text",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refreshd",
        description=HEADLINE,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"refreshd {refreshd_version()}")
    _logging_options(parser, default=None)
    # the same options after the subcommand; SUPPRESS keeps an earlier value
    common = argparse.ArgumentParser(add_help=False)
    _logging_options(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "refresh", parents=[common], help="refresh one manager now (full, or --target ...)"
    )
    p.add_argument("--config", help="TOML config (default: the embedded default)")
    p.add_argument("--manager", required=True)
    p.add_argument(
        "--target",
        action="append",
        metavar="COLLECTION:REF",
        help="refresh only this object (repeatable), e.g. vms:vm-000012",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--demo-into-database", action="store_true", help=DEMO_HELP)
    p.add_argument(
        "--confirm-deletions",
        action="store_true",
        help="full refresh that applies the deletions the mass-deletion guard would hold back",
    )

    db = sub.add_parser("db", parents=[common], help="database schema")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", parents=[common], help="apply migrations")
    up.add_argument("--config")

    c = sub.add_parser(
        "check-config", parents=[common], help="validate a config file (all problems at once)"
    )
    c.add_argument("--config", required=True)

    sub.add_parser(
        "simulator",
        help="run the AwesomeCloud simulator standalone (refreshd simulator --help)",
        add_help=False,
    )

    r = sub.add_parser(
        "run", parents=[common], help="run the daemon (no --config: the embedded demo)"
    )
    r.add_argument("--config", help="TOML config (default: SQLite + embedded simulator)")
    r.add_argument("--demo-into-database", action="store_true", help=DEMO_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulator"]:
        configure_logging(level="info")
        try:
            return cmd_simulator(argv[1:])
        except UsageError as exc:
            print(f"refreshd: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    configure_logging(
        level=args.log_level or "info", fmt=LogFormat(args.log_format or LogFormat.TEXT.value)
    )
    try:
        if args.command == "refresh":
            return asyncio.run(cmd_refresh(args))
        if args.command == "db":
            return asyncio.run(cmd_db_upgrade(args))
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "run":
            refuse_demo_into_database(args)
            loaded = load_config(args.config)
            preflight(loaded)
            configure_logging(
                level=args.log_level or loaded.config.log_level,
                fmt=LogFormat(args.log_format or loaded.config.log_format),
            )
            return asyncio.run(cmd_run(loaded))
    except (ConfigError, UsageError, DatabaseURLError, SecretUnavailableError) as exc:
        print(f"refreshd: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"refreshd: {exc}: pip install 'refreshd[{extra}]'", file=sys.stderr)
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
