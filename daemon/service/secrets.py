"""Secrets: one way to give every credential, read when it is used, checked before start.

Flow: config ([http] token, a manager's ``token``, Kafka's ``sasl_password``,
``database_url``, ...) -> **Secret** -> the client that sends it.

A secret is written as exactly one of::

    token = { value = "inline, for tests" }
    token = { env = "REFRESHD_HTTP_TOKEN" }          # e.g. from EnvironmentFile=
    token = { file = "/etc/refreshd/http-token" }    # whitespace around it is stripped
    token = { credential = "http-token" }            # systemd: LoadCredential=http-token:...

``credential`` reads ``$CREDENTIALS_DIRECTORY/<name>``, the directory systemd
fills from ``LoadCredential=`` / ``SetCredential=`` (readable by the service
only, never in the environment).  A plain string is accepted as ``value``.
The value is never printed (``repr`` names the source only).  ``check-config``
and ``run`` reveal every secret once before anything starts
(:func:`secret_problems`), so a missing variable, file or credential is a
configuration error naming the key, not a failure at the first request.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr, model_validator

CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"


class SecretUnavailableError(ValueError):
    """The variable, file or credential a secret names cannot be read."""


class Secret(BaseModel):
    """A secret given inline, by environment variable, by file or by systemd credential."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: SecretStr | None = None
    env: str | None = None
    file: Path | None = None
    credential: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain_string_is_a_value(cls, data: Any) -> Any:
        return {"value": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_source(self) -> Secret:
        given = (self.value, self.env, self.file, self.credential)
        if sum(x is not None for x in given) != 1:
            raise ValueError("give exactly one of value, env, file, credential")
        if self.credential is not None and (
            not self.credential or "/" in self.credential or self.credential in (".", "..")
        ):
            raise ValueError(f"credential {self.credential!r}: a name, not a path")
        return self

    def describe(self) -> str:
        """Where the secret comes from (never its value)."""
        if self.env is not None:
            return f"environment variable {self.env}"
        if self.file is not None:
            return f"file {self.file}"
        if self.credential is not None:
            return f"systemd credential {self.credential}"
        return "inline value"

    def reveal(self) -> str:
        """The secret's value; :class:`SecretUnavailableError` says why it cannot be read."""
        if self.value is not None:
            return self.value.get_secret_value()
        if self.env is not None:
            if self.env not in os.environ:
                raise SecretUnavailableError(f"environment variable {self.env} is not set")
            return os.environ[self.env]
        if self.credential is not None:
            directory = os.environ.get(CREDENTIALS_DIRECTORY)
            if not directory:
                raise SecretUnavailableError(
                    f"systemd credential {self.credential}: $CREDENTIALS_DIRECTORY is not set "
                    f"(give it with LoadCredential={self.credential}:/path in the unit)"
                )
            return _read(Path(directory) / self.credential, f"credential {self.credential}")
        assert self.file is not None
        return _read(self.file, "file")

    def __repr__(self) -> str:
        return f"Secret({self.describe()})"

    __str__ = __repr__


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise SecretUnavailableError(f"cannot read secret {what} {path}: {exc.strerror}") from None


def find_secrets(value: Any, path: str = "") -> Iterator[tuple[str, Secret]]:
    """Every Secret in a validated config (models, lists, mappings), with its key path."""
    if isinstance(value, Secret):
        yield path, value
    elif isinstance(value, BaseModel):
        names = list(type(value).model_fields) + list(value.model_extra or {})
        for name in names:
            yield from find_secrets(getattr(value, name, None), _join(path, name))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from find_secrets(item, _join(path, str(key)))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from find_secrets(item, f"{path}[{i}]")


SOURCES = frozenset({"value", "env", "file", "credential"})


def raw_secrets(options: Mapping[str, Any]) -> dict[str, Secret]:
    """The secrets among a plugin's raw options (tables with one key of ``SOURCES``), for
    checking before the plugin reads them at start."""
    found = {}
    for key, value in options.items():
        if isinstance(value, Mapping) and len(value) == 1 and set(value) <= SOURCES:
            try:
                found[key] = Secret.model_validate(value)
            except ValueError:
                continue  # the plugin's own validation reports it
    return found


def secret_problems(value: Any, path: str = "") -> list[str]:
    """``key: why`` for each secret under ``value`` that cannot be read."""
    problems = []
    for key, secret in find_secrets(value, path):
        try:
            secret.reveal()
        except SecretUnavailableError as exc:
            problems.append(f"{key}: {exc}")
    return problems


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
