"""Configuration: one TOML file, validated with messages that name the file and the key.

Flow: **config** -> daemon start-up (database, managers, batching, catchers, http).

Unknown keys and bad values are errors (``refreshd.toml: managers[0].page_size:
Input should be greater than or equal to 1``), never silently ignored.
Durations accept seconds (``1.5``) or a unit (``"500ms"``, ``"30s"``, ``"5m"``,
``"1h"``).  ``REFRESHD_DATABASE_URL`` overrides ``database_url``; secrets can
be read from the environment or a file (see ``Secret``).  Each manager's
provider-specific keys are validated by that provider's own settings model.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from daemon.db import DEFAULT_DATABASE_URL
from daemon.provider import UnknownProviderError, load_provider

DATABASE_URL_ENV = "REFRESHD_DATABASE_URL"

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


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Secret(_Strict):
    """A secret given inline, by environment variable, or by file (exactly one)."""

    value: SecretStr | None = None
    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Secret:
        if sum(x is not None for x in (self.value, self.env, self.file)) != 1:
            raise ValueError("give exactly one of value, env, file")
        return self

    def reveal(self) -> str:
        if self.value is not None:
            return self.value.get_secret_value()
        if self.env is not None:
            if self.env not in os.environ:
                raise ConfigError(f"environment variable {self.env} (a secret) is not set")
            return os.environ[self.env]
        assert self.file is not None
        try:
            return self.file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {self.file}: {exc}") from None


class PersisterConfig(_Strict):
    max_delete_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="refuse a full refresh that would archive/delete more than this share of rows",
    )
    mass_delete_min_rows: int = Field(
        10, ge=0, description="removing at most this many rows is never refused"
    )


class BatchingConfig(_Strict):
    """The ``[batching]`` table; every key optional (defaults in daemon/batcher.py)."""

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
    over (daemon/ownership.py, docs/scaling.md); unused on SQLite."""

    keepalive: Duration = Field(2.0, gt=0, description="seconds between keepalives")
    session_timeout: Duration = Field(
        10.0, gt=0, description="a silent process loses its managers after this many seconds"
    )
    release_after: Duration = Field(
        5.0, ge=0, description="seconds without work before a manager is given back"
    )
    save_idle_timeout: Duration = Field(
        120.0, gt=0, description="a save transaction idle this long is ended by the server"
    )


class HttpConfig(_Strict):
    listen: str = "127.0.0.1:8080"
    token: Secret | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return (host or "127.0.0.1", int(port))


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


def format_validation_error(source: str, exc: ValidationError, prefix: str = "") -> str:
    """One line per error: ``FILE: key.path: message``."""
    lines = []
    for err in exc.errors():
        loc = prefix
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        lines.append(f"{source}: {loc or '(top level)'}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> LoadedConfig:
    """Validate ``data`` (a parsed TOML document) and the managers' provider settings."""
    data = dict(data)
    if env_url := os.environ.get(DATABASE_URL_ENV):
        data["database_url"] = env_url
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None
    settings: dict[str, BaseModel] = {}
    errors = []
    for i, m in enumerate(config.managers):
        try:
            provider = load_provider(m.provider)
        except UnknownProviderError as exc:
            errors.append(f"{source}: managers[{i}].provider: {exc}")
            continue
        try:
            settings[m.name] = provider.settings_model.model_validate(m.provider_options)
        except ValidationError as exc:
            errors.append(format_validation_error(source, exc, prefix=f"managers[{i}]"))
    if errors:
        raise ConfigError("\n".join(errors))
    return LoadedConfig(config=config, source=source, provider_settings=settings)


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
    "batching": {"debounce": 0.2, "max_delay": 2.0},
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
