"""Settings of one AwesomeCloud manager (its ``[[managers]]`` block in the config).

Flow: config -> **settings** -> connection (client + collector) for one manager.

The daemon validates a manager's provider-specific settings with
:class:`AwesomeCloudSettings` (the provider's ``settings_model``) before it
connects; unknown keys are refused so a typo fails at start, not at 3 a.m.
Every field says its unit and default.
"""

from __future__ import annotations

from typing import Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from daemon.api import Duration, Secret

EMBEDDED = "embedded"
"""The endpoint value that starts an in-process simulator instead of calling a remote one."""


class AwesomeCloudSettings(BaseModel):
    """How to reach one AwesomeCloud endpoint and how hard to try."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(
        description=(
            'Base URL of the AwesomeCloud API (http or https), or "embedded" to start an '
            "in-process simulator on a free loopback port. Required."
        )
    )
    embedded_vms: int = Field(
        100, ge=0, description="Number of vms the embedded simulator seeds. Default 100."
    )
    embedded_seed: int = Field(1, description="Random seed of the embedded simulator. Default 1.")
    embedded_name: str = Field(
        "awesome",
        min_length=1,
        description='Name of the embedded simulator (its events\' source). Default "awesome".',
    )
    embedded_churn_per_second: float = Field(
        0.0,
        ge=0,
        description="Random cloud changes a second the embedded simulator applies to itself "
        "(each emits its event). Default 0 (a still cloud).",
    )
    page_size: int = Field(
        500, ge=1, le=5000, description="Objects per page of a listing, 1..5000. Default 500."
    )
    ids_per_request: int = Field(
        100,
        ge=1,
        le=1000,
        description="Ids per by-id request of a targeted refresh, 1..1000. Default 100.",
    )
    request_timeout: Duration = Field(
        30.0, gt=0, description="Seconds one HTTP request may take in total. Default 30."
    )
    retries: int = Field(
        5,
        ge=0,
        description=(
            "Retries of a request after 429, 5xx, timeouts and connection errors "
            "(attempts = retries + 1). Default 5."
        ),
    )
    backoff_initial: Duration = Field(
        0.2, gt=0, description="Seconds before the first retry; doubles each retry. Default 0.2."
    )
    backoff_max: Duration = Field(
        10.0,
        gt=0,
        description=(
            "Upper bound in seconds of one computed backoff (a server's Retry-After is "
            "bounded by retry_after_max instead). Default 10."
        ),
    )
    retry_after_max: float = Field(
        60.0,
        ge=0,
        description=(
            "Upper bound in seconds of one wait asked by a server's Retry-After; a longer one "
            "(a 429 with Retry-After: 600) is waited for only this long. Default 60."
        ),
    )
    token: Secret | None = Field(
        None,
        description="Bearer token sent as 'Authorization: Bearer ...' (a secret: "
        "{ value | env | file | credential }). Default none.",
    )

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        value = value.strip()
        if value == EMBEDDED:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f'endpoint must be "embedded" or an http(s) URL, not {value!r}')
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_backoff(self) -> Self:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be >= backoff_initial")
        return self

    @property
    def is_embedded(self) -> bool:
        return self.endpoint == EMBEDDED
