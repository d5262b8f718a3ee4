"""The webhook catcher's settings and counters: what a ``[[catchers]]`` block of type webhook holds.

Flow: ``[[catchers]] type = "webhook"`` -> **WebhookSettings** -> catchers.webhook.catcher
-> **WebhookStats** -> daemon metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from catchers.intake import dead_letter_counts
from daemon.api import CatcherStats, Duration, Secret


class WebhookSettings(BaseModel):
    """One webhook catcher (a ``[[catchers]]`` block with ``type = "webhook"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "webhook"
    """The catcher's name in logs and metrics."""
    path: str = "/events"
    """The URL path the events are POSTed to."""
    manager: str | None = None
    """The manager of every event not claimed by ``routes``."""
    routes: dict[str, str] = Field(default_factory=dict)
    """CloudEvents ``source`` -> manager; checked before ``manager``."""
    token: Secret | None = None
    """Bearer token senders must give (``{value|env|file}``); default: the ``[http]`` token."""
    max_wait: Duration = Field(60.0, gt=0)
    """Seconds a request waits for its targets to be committed before a 503."""
    max_body_bytes: int = Field(1024 * 1024, ge=1)
    """Larger bodies are refused with 413."""
    retry_after: int = Field(5, ge=0)
    """Seconds, the ``Retry-After`` of every 503."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("path must start with '/'")
        return value

    @model_validator(mode="after")
    def _routed(self) -> Self:
        if self.manager is None and not self.routes:
            raise ValueError("give manager and/or routes (source = manager)")
        return self


@dataclass(slots=True)
class WebhookStats(CatcherStats):
    """The webhook catcher's counters since start.

    ``received``: events in authenticated requests (an undecodable body counts as one);
    ``decoded``: events decoded, routed and mapped; ``skipped``: accepted events that
    asked for no target; ``submitted``: handed to the batcher; ``dead_lettered``: events
    refused with 400, by reason.
    """

    dead_lettered: dict[str, int] = field(default_factory=dead_letter_counts)
    committed: int = 0
    """Requests answered 200."""
    busy: int = 0
    """Requests answered 503 before waiting (no room, not running)."""
    timed_out: int = 0
    """Requests answered 503 after ``max_wait``."""
    closed_waiting: int = 0
    """Requests answered 503 because the catcher closed while they waited."""
    unauthorized: int = 0
    too_large: int = 0
    mapper_failures: int = 0
    """Requests answered 500 because a mapper raised something other than ValueError."""
    waiting: int = 0
    """Requests waiting for their commit (updated when read)."""
