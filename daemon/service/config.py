"""Configuration: one TOML file, validated with messages that name the file and the key.

Flow: **config** -> daemon start-up (database, managers, batching, catchers, http).
The ``[http]`` table is :mod:`daemon.service.http_config`; messages are written by
:mod:`daemon.service.validation_errors`.

Unknown keys and bad values are errors (``refreshd.toml: managers[0].page_size:
Input should be greater than or equal to 1``), never silently ignored.
Durations accept seconds (``1.5``) or a unit (``"500ms"``, ``"30s"``, ``"5m"``,
``"1h"``).  ``REFRESHD_DATABASE_URL`` overrides ``database_url``; secrets can
be given inline, by environment variable, file or systemd credential
(:mod:`daemon.service.secrets`).  Each manager's
provider-specific keys are validated by that provider's own settings model.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from daemon.model.provider import UnknownProviderError, load_provider
from daemon.persistence.db import DEFAULT_DATABASE_URL
from daemon.pipeline.batches import GLOBAL_BATCHING_KEYS, BatchingSettings
from daemon.pipeline.ownership import OwnershipSettings
from daemon.service.http_config import HttpConfig
from daemon.service.secrets import Secret, SecretUnavailableError
from daemon.service.validation_errors import format_validation_error

__all__ = ["ConfigError", "Duration", "LoadedConfig", "Secret", "load_config", "parse_config"]

DATABASE_URL_ENV = "REFRESHD_DATABASE_URL"
UNREADABLE_DATABASE_URL = "sqlite+aiosqlite:///unreadable-database-url-secret"
"""Stands in for a ``database_url`` secret that cannot be read (never used: see deferred)."""

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def _parse_duration(value: Any) -> Any:
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"invalid duration {value!r}; use seconds or e.g. '500ms', '5m'")
        return float(match.group(1)) * _UNITS[match.group(2) or "s"]
    return value


Duration = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)]


_OWNERSHIP = OwnershipSettings()


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PersisterConfig(_Strict):
    max_delete_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="hold back the deletions of a full refresh that would archive/delete more "
        "than this share of rows (everything else is saved)",
    )
    mass_delete_min_rows: int = Field(
        10, ge=0, description="removing at most this many rows is never held back"
    )
    keep_runs: Duration = Field(
        30 * 86400.0,
        description="refresh_runs rows older than this are pruned by the daemon (0: keep all)",
    )


class BatchingConfig(_Strict):
    """The ``[batching]`` table; every key optional (defaults in daemon/pipeline/batcher.py)."""

    debounce: Duration | None = None
    max_delay: Duration | None = None
    max_targets: int | None = Field(None, ge=1)
    full_refresh_threshold: int | None = Field(None, ge=1)
    workers: int | None = Field(None, ge=1)
    retry_initial: Duration | None = None
    retry_max: Duration | None = None
    retry_multiplier: float | None = Field(None, ge=1)
    retry_jitter: float | None = Field(None, ge=0, le=1)
    escalate_after: int | None = Field(None, ge=1)
    max_pending_targets: int | None = Field(None, ge=1)

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ManagerConfig(BaseModel):
    """A ``[[managers]]`` block; keys not listed here belong to the provider."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    provider: str
    allow_targeted_refresh: bool = True
    refresh_interval: Duration = 3600.0
    batching: BatchingConfig = BatchingConfig()

    @property
    def provider_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OwnershipConfig(_Strict):
    """The ``[ownership]`` table: how processes sharing a PostgreSQL database hand managers
    over (daemon/pipeline/ownership.py, docs/scaling.md); unused on SQLite.  The keys and
    defaults are those of :class:`OwnershipSettings`, which takes them as they are."""

    keepalive: Duration = Field(
        _OWNERSHIP.keepalive, gt=0, description="seconds between keepalives"
    )
    session_timeout: Duration = Field(
        _OWNERSHIP.session_timeout,
        gt=0,
        description="a silent process loses its managers after this many seconds",
    )
    release_after: Duration = Field(
        _OWNERSHIP.release_after,
        ge=0,
        description="seconds without work before a manager is given back",
    )
    save_idle_timeout: Duration = Field(
        _OWNERSHIP.save_idle_timeout,
        gt=0,
        description="a save transaction idle this long is ended by the server",
    )

    def settings(self) -> OwnershipSettings:
        return OwnershipSettings(**self.model_dump())


class CatcherConfig(BaseModel):
    """A ``[[catchers]]`` block; keys beyond ``type`` belong to that catcher."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    name: str | None = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Config(_Strict):
    database_url: str = DEFAULT_DATABASE_URL
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    shutdown_timeout: Duration = 30.0
    status_interval: Duration = 10.0
    instance_name: str | None = Field(
        None, min_length=1, max_length=200, description="process identity; default host:pid"
    )
    persister: PersisterConfig = PersisterConfig()
    ownership: OwnershipConfig = OwnershipConfig()
    batching: BatchingConfig = BatchingConfig()
    http: HttpConfig = HttpConfig()
    managers: list[ManagerConfig] = Field(default_factory=list)
    catchers: list[CatcherConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for m in self.managers:
            if m.name in seen:
                raise ValueError(f"manager name {m.name!r} is used twice")
            seen.add(m.name)
        return self

    def manager(self, name: str) -> ManagerConfig:
        for m in self.managers:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.managers) or "none"
        raise ConfigError(f"no manager named {name!r} in the config (configured: {known})")


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """The validated config plus each manager's validated provider settings."""

    config: Config
    source: str
    provider_settings: Mapping[str, BaseModel]
    deferred: tuple[str, ...] = ()
    """Problems that do not stop validation but stop any use (an unreadable
    ``database_url`` secret): listed by check-config with the rest, raised by
    :meth:`usable`."""

    def usable(self) -> LoadedConfig:
        """This config, or ConfigError when a deferred problem makes it unusable."""
        if self.deferred:
            raise ConfigError("\n".join(f"{self.source}: {p}" for p in self.deferred))
        return self


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> LoadedConfig:
    """Validate ``data`` (a parsed TOML document) and the managers' provider settings."""
    data = dict(data)
    if env_url := os.environ.get(DATABASE_URL_ENV):
        data["database_url"] = env_url
    deferred: list[str] = []
    errors: list[str] = []
    if not env_url and isinstance(data.get("database_url"), Mapping):
        try:
            data["database_url"] = _database_url_secret(data["database_url"], source)
        except SecretUnavailableError as exc:
            deferred.append(f"database_url: {exc}")
            data["database_url"] = UNREADABLE_DATABASE_URL
        except ConfigError as exc:
            errors.append(str(exc))
            data.pop("database_url")
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors.append(format_validation_error(source, exc, model=Config))
    # each manager's provider keys, even when the rest has errors (all problems at once)
    settings: dict[str, BaseModel] = {}
    raw_managers = data.get("managers")
    for i, raw in enumerate(raw_managers if isinstance(raw_managers, list) else []):
        if not isinstance(raw, Mapping) or not isinstance(raw.get("provider"), str):
            continue
        try:
            provider = load_provider(raw["provider"])
        except UnknownProviderError as exc:
            errors.append(f"{source}: managers[{i}].provider: {exc}")
            continue
        options = {k: v for k, v in raw.items() if k not in ManagerConfig.model_fields}
        try:
            settings[str(raw.get("name"))] = provider.settings_model.model_validate(options)
        except ValidationError as exc:
            errors.append(
                format_validation_error(
                    source,
                    exc,
                    prefix=f"managers[{i}]",
                    model=provider.settings_model,
                    also_known=ManagerConfig.model_fields,
                )
            )
    if config is not None:
        errors += _batching_errors(config, source)
    if errors:
        raise ConfigError("\n".join(errors))
    assert config is not None
    return LoadedConfig(
        config=config, source=source, provider_settings=settings, deferred=tuple(deferred)
    )


def _batching_errors(config: Config, source: str) -> list[str]:
    """What BatchingSettings would refuse at start (retry_initial > retry_max, ...), per
    layer: ``[batching]``, then each manager's own table over it; and a global key
    (``workers``, ``max_pending_targets``) in a manager's own table."""
    base = BatchingSettings()
    errors = [
        f"{source}: managers[{i}].batching.{key}: {key} is global ({meaning}), not per "
        f"manager: set it in [batching], not in manager {m.name!r}'s [managers.batching]"
        for i, m in enumerate(config.managers)
        for key, meaning in GLOBAL_BATCHING_KEYS.items()
        if key in m.batching.overrides()
    ]
    layers = [("batching", config.batching.overrides())] + [
        (f"managers[{i}].batching", config.batching.overrides() | m.batching.overrides())
        for i, m in enumerate(config.managers)
    ]
    for key, values in layers:
        merged = {"retry_initial": base.retry_initial, "retry_max": base.retry_max} | values
        if merged["retry_initial"] > merged["retry_max"]:
            errors.append(
                f"{source}: {key}: retry_initial ({merged['retry_initial']:g}s) is longer than "
                f"retry_max ({merged['retry_max']:g}s)"
            )
            if key == "batching":
                break
            continue
        try:
            replace(base, **values)
        except ValueError as exc:
            errors.append(f"{source}: {key}: {exc}")
            if key == "batching":
                break  # every manager inherits it: one message is enough
    return errors


def _database_url_secret(value: Mapping[str, Any], source: str) -> str:
    """``database_url = { credential = "database-url" }``: the URL (with its password) as a
    secret, read at load time."""
    try:
        return Secret.model_validate(value).reveal()
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, prefix="database_url")) from None


def load_config(path: str | Path | None) -> LoadedConfig:
    """Read and validate a TOML file; ``None`` gives the embedded default."""
    if path is None:
        return parse_config(EMBEDDED_DEFAULT, source="<embedded default>")
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return parse_config(data, source=str(p))


EMBEDDED_DEFAULT: dict[str, Any] = {
    "status_interval": 5.0,
    "managers": [
        {
            "name": "awesome",
            "provider": "awesome_cloud",
            "endpoint": "embedded",
            "embedded_vms": 1000,
            "embedded_churn_per_second": 20.0,
            "refresh_interval": 300.0,
        }
    ],
    "catchers": [{"type": "inprocess", "manager": "awesome"}],
}
"""The config used with no ``--config``: SQLite and an embedded AwesomeCloud simulator."""
