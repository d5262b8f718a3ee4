"""Settings of one AWS manager: one account in one region (its ``[[managers]]`` block).

Flow: config -> **settings** -> connection (EC2 client + collector) for one manager.

Credentials are never settings: the connection uses the standard AWS chain
(environment variables, the shared config/credentials files and ``profile``,
web identity, container and instance roles), exactly as the AWS CLI does, so
rotating keys needs no change here.  Unknown keys are refused so a typo fails
at start.  Every field says its unit and default.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from daemon.api import Duration

MAX_FILTER_VALUES = 200
"""EC2 accepts at most 200 values in one filter (ManageIQ's max_filter_size)."""

_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")
_ACCOUNT = re.compile(r"\d{12}")


class AwsSettings(BaseModel):
    """Which account and region to refresh, and how hard to try."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    region: str = Field(description='The region to refresh, e.g. "us-east-1". Required.')
    account_id: str | None = Field(
        None,
        description=(
            "The 12-digit account id. Optional: when left out it is asked of STS "
            "(GetCallerIdentity) at the first refresh. Events are routed by account and "
            "region, so setting it lets events route before the first refresh."
        ),
    )
    profile: str | None = Field(
        None, description="A profile of the shared AWS config files. Default: the chain's default."
    )
    endpoint_url: str | None = Field(
        None,
        description="EC2/STS endpoint URL (a VPC endpoint, LocalStack, moto). Default: AWS's own.",
    )
    keep_terminated: bool = Field(
        False,
        description=(
            "Keep terminated instances as vms in state 'terminated' instead of archiving them "
            "(ManageIQ's ignore_terminated_instances = false). Default false."
        ),
    )
    own_images: bool = Field(
        True,
        description=(
            "A full refresh also lists the images the account owns, used or not. "
            "Images an instance uses are always collected. Default true."
        ),
    )
    page_size: int = Field(
        1000,
        ge=5,
        le=1000,
        description="Instances per DescribeInstances page of a full refresh, 5..1000. "
        "Default 1000.",
    )
    ids_per_request: int = Field(
        MAX_FILTER_VALUES,
        ge=1,
        le=MAX_FILTER_VALUES,
        description="Ids per by-id request of a targeted refresh, 1..200. Default 200.",
    )
    max_attempts: int = Field(
        8,
        ge=1,
        le=20,
        description=(
            "Attempts of one API call (botocore's retries) after throttling, 5xx and "
            "connection errors. Default 8."
        ),
    )
    retry_mode: Literal["standard", "adaptive"] = Field(
        "standard",
        description=(
            'botocore retry mode: "standard" (exponential backoff with jitter) or '
            '"adaptive" (also rate-limits the client after throttling). Default "standard".'
        ),
    )
    connect_timeout: Duration = Field(10.0, gt=0, description="Seconds to connect. Default 10.")
    read_timeout: Duration = Field(
        60.0, gt=0, description="Seconds to wait for an answer. Default 60."
    )

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        value = value.strip()
        if not _REGION.fullmatch(value):
            raise ValueError(f'region must look like "us-east-1", not {value!r}')
        return value

    @field_validator("account_id")
    @classmethod
    def _check_account(cls, value: str | None) -> str | None:
        if value is not None and not _ACCOUNT.fullmatch(value.strip()):
            raise ValueError(f"account_id must be 12 digits, not {value!r}")
        return value.strip() if value is not None else None

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"endpoint_url must be an http(s) URL, not {value!r}")
        return value.strip().rstrip("/")
