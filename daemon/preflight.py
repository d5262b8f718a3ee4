"""Pre-flight: everything ``run`` would refuse, found before anything starts.

Flow: cli (``check-config`` and ``run``) -> config -> **preflight** -> daemon start-up.

:func:`daemon.config.load_config` checks the file against the schema (unknown
keys with a suggestion, bad values, durations, ``listen``, retry bounds, each
provider's keys).  This step checks what needs the environment: the database
driver is installed (else the extra to install), every secret can be read
(variable set, file or systemd credential present), and every catcher can be
built from its options (constructors do no I/O).  All problems are returned at
once, each naming the file and key; ``run`` exits 2 on any, so systemd does
not restart a daemon that cannot start (``RestartPreventExitStatus=2``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

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
from daemon.config import LoadedConfig, format_validation_error
from daemon.db import DatabaseURLError, create_engine
from daemon.provider import EXTRA_OF_MODULE
from daemon.secrets import SecretUnavailableError, raw_secrets, secret_problems
from daemon.targets import TargetCollection


def config_problems(loaded: LoadedConfig) -> list[str]:
    """``FILE: key: problem`` lines; empty when ``run`` can start with this config."""
    return [f"{loaded.source}: {p}" for p in _problems(loaded)]


def _problems(loaded: LoadedConfig) -> Iterator[str]:
    cfg = loaded.config
    yield from loaded.deferred
    try:
        create_engine(cfg.database_url)  # imports the driver, no I/O
    except DatabaseURLError as exc:
        yield f"database_url: {exc}"
    except ImportError as exc:
        yield f"database_url: {_missing(exc)}"
    yield from secret_problems(cfg)
    for i, m in enumerate(cfg.managers):
        settings = loaded.provider_settings.get(m.name)
        if settings is not None:
            yield from secret_problems(settings, f"managers[{i}]")
    yield from _catcher_problems(loaded)


def _missing(exc: ImportError) -> str:
    module = (exc.name or "").partition(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra:
        return f"the {module} driver is not installed: pip install 'refreshd[{extra}]'"
    return f"cannot import {module or exc}: {exc}"


def _catcher_problems(loaded: LoadedConfig) -> Iterator[str]:
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
        key = f"catchers[{i}]"
        options = c.options | ({"name": c.name} if c.name else {})
        yield from secret_problems(raw_secrets(c.options), key)
        try:
            load_catcher(c.type)(options, context)
        except ValidationError as exc:
            for line in format_validation_error("", exc, prefix=key).splitlines():
                yield line.removeprefix(": ")
        except SecretUnavailableError as exc:
            yield f"{key} ({c.type}): {exc}"
        except ImportError as exc:
            yield f"{key} ({c.type}): {_missing(exc)}"
        except (ValueError, UnknownPluginError) as exc:
            yield f"{key} ({c.type}): {exc}"
