"""Pre-flight: everything ``run`` would refuse, found before anything starts.

Flow: cli (``check-config`` and ``run``) -> config -> **preflight** -> daemon start-up.

:func:`daemon.service.config.load_config` checks the file against the schema (unknown
keys with a suggestion, bad values, durations, ``listen``, retry bounds, each
provider's keys).  This step checks what needs the environment: the database
driver is installed (else the extra to install), every secret can be read
(variable set, file or systemd credential present), and every catcher can be
built from its options (constructors do no I/O).  All problems are returned at
once, each naming the file and key; ``run`` exits 2 on any, so systemd does
not restart a daemon that cannot start (``RestartPreventExitStatus=2``).
"""

from __future__ import annotations

import difflib
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from daemon.model.catcher import (
    CatcherContext,
    ManagerEndpoint,
    UnknownPluginError,
    load_catcher,
)
from daemon.model.provider import EXTRA_OF_MODULE, UnknownProviderError, load_provider
from daemon.model.targets import TargetCollection
from daemon.persistence.db import DatabaseURLError, create_engine
from daemon.pipeline.batcher import Batcher
from daemon.service.config import LoadedConfig, format_validation_error
from daemon.service.secrets import SecretUnavailableError, raw_secrets, secret_problems


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
            provider = load_provider(m.provider)
        except UnknownProviderError:
            continue
        endpoints[m.name] = ManagerEndpoint.of(m.name, m.provider, provider)

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
            factory = load_catcher(c.type)
        except UnknownPluginError as exc:
            yield f"{key} ({c.type}): {exc}"
            continue
        models = _settings_models(factory)
        try:
            factory(options, context)
        except ValidationError as exc:
            model = next((m for m in models if m.__name__ == exc.title), None)
            text = format_validation_error("", exc, prefix=key, model=model, also_known=["type"])
            for line in text.splitlines():
                yield line.removeprefix(": ")
        except SecretUnavailableError as exc:
            yield f"{key} ({c.type}): {exc}"
        except ImportError as exc:
            yield f"{key} ({c.type}): {_missing(exc)}"
        except (ValueError, UnknownPluginError) as exc:
            yield f"{key} ({c.type}): {_suggest(str(exc), models)}"


def _settings_models(factory: Any) -> list[type[BaseModel]]:
    """The pydantic models in a catcher's module: where its option names are declared."""
    module = sys.modules.get(getattr(factory, "__module__", ""))
    return (
        [
            value
            for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, BaseModel) and value is not BaseModel
        ]
        if module is not None
        else []
    )


_UNKNOWN_KEY = re.compile(r"([A-Za-z_][\w.]*): Extra inputs are not permitted")


def _suggest(message: str, models: list[type[BaseModel]]) -> str:
    """A catcher's own message, with the closest known option after each unknown one."""
    known = sorted({"type", *(f for m in models for f in m.model_fields)})

    def hint(match: re.Match[str]) -> str:
        close = difflib.get_close_matches(match.group(1).rpartition(".")[2], known, n=1)
        return match.group(0) + (f" (did you mean {close[0]!r}?)" if close else "")

    return _UNKNOWN_KEY.sub(hint, message)
