"""The SQS catcher's settings and counters: what a ``[[catchers]]`` block of type sqs holds.

Flow: ``[[catchers]] type = "sqs"`` -> **SqsSettings** -> catchers.sqs.SqsCatcher
-> **SqsCatcherStats** -> daemon metrics.

Durations are seconds or strings with a unit (``"500ms"``, ``"20s"``, ``"1m"``),
like every duration of the daemon's config (``daemon.service.config.Duration``); the
two that SQS itself takes (``wait_time``, ``visibility_timeout``) must be whole
seconds.  Unknown keys are errors that name the key: in particular there is no
key for AWS credentials, which come from the standard AWS chain (environment,
shared profile, instance or task role).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from catchers.intake import dead_letter_counts
from daemon.api import CatcherStats, Duration

_REGION_LABEL = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d+")


class SqsSettings(BaseModel):
    """One SQS catcher: ``concurrency`` long-poll loops on ``queue_url``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue_url: str
    """``https://sqs.<region>.amazonaws.com/<account>/<queue>`` (or the emulator's URL)."""
    name: str = "sqs"
    """The catcher's name in logs and metrics."""
    region: str | None = None
    """None: the region in ``queue_url``'s host, else the AWS chain (``AWS_REGION``, profile)."""
    endpoint_url: str | None = None
    """The SQS endpoint to call (moto, LocalStack, a VPC endpoint); None: AWS's own."""
    wait_time: Duration = Field(20.0, ge=1, le=20)
    """Long-poll wait of one ReceiveMessage (whole seconds, 1..20)."""
    max_messages: int = Field(10, ge=1, le=10)
    """Messages asked for by one ReceiveMessage (1..10)."""
    visibility_timeout: Duration = Field(60.0, ge=2, le=43200)
    """Whole seconds a received message stays invisible; renewed (in batches) while its
    targets are pending, when less than a third of it is left."""
    concurrency: int = Field(1, ge=1, le=64)
    """Receive loops running at once."""
    delete_poison: bool = False
    """Delete (and log) messages that cannot be decoded, routed or mapped, instead of
    leaving them to the queue's redrive policy (required when the queue has none)."""
    retry_mode: Literal["standard", "adaptive"] = "standard"
    """botocore's retry mode for every SQS call (retries throttling, 5xx, connection errors)."""
    receive_backoff: tuple[Duration, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
    """Delays after a failed receive, once botocore's own retries are spent (the last repeats)."""
    delete_backoff: tuple[Duration, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    """Delays between attempts to delete a message; after the last one it is given up
    (logged: it will be received and refreshed again, which is harmless)."""
    drain_timeout: Duration = 5.0
    """On close: how long deleting the acknowledged messages and releasing the others may take."""

    @field_validator("queue_url")
    @classmethod
    def _queue_url(cls, value: str) -> str:
        queue_parts(value)
        return value

    @field_validator("wait_time", "visibility_timeout")
    @classmethod
    def _whole_seconds(cls, value: float) -> float:
        if value != int(value):
            raise ValueError("must be a whole number of seconds (SQS counts in seconds)")
        return value

    @field_validator("receive_backoff", "delete_backoff")
    @classmethod
    def _non_empty_backoff(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("a backoff needs at least one delay")
        return value

    @property
    def queue_name(self) -> str:
        return queue_parts(self.queue_url)[1]

    def region_name(self) -> str | None:
        """``region``, else the region named in ``queue_url``'s host, else None (AWS chain)."""
        return self.region or region_of(self.queue_url)


def queue_parts(queue_url: str) -> tuple[str, str]:
    """``(account, queue name)`` of a queue URL; ValueError when it is not one."""
    parts = urlsplit(queue_url)
    segments = [segment for segment in parts.path.split("/") if segment]
    if parts.scheme not in ("http", "https") or not parts.netloc or len(segments) != 2:
        raise ValueError(
            f"not an SQS queue URL: {queue_url!r} (expected https://<host>/<account>/<queue>)"
        )
    return segments[0], segments[1]


def region_of(queue_url: str) -> str | None:
    """The region a queue URL's host names (``sqs.eu-west-1.amazonaws.com``), if any."""
    host = urlsplit(queue_url).hostname or ""
    return next((label for label in host.split(".") if _REGION_LABEL.fullmatch(label)), None)


@dataclass(slots=True)
class SqsCatcherStats(CatcherStats):
    """The SQS catcher's counters since start.

    ``received``: messages received (a message delivered again counts again);
    ``decoded``: received messages whose body decoded (whether or not they could be
    routed and mapped); ``submitted``: handed to the batcher (a message held for room
    counts once, when taken); ``skipped``: asked for no target, deleted at once;
    ``acknowledged``: all targets committed; ``dead_lettered``: poison messages on their
    last receive before the redrive policy moves them to the dead-letter queue, or
    deleted with delete_poison, by reason.
    """

    dead_lettered: dict[str, int] = field(default_factory=dead_letter_counts)
    deleted: int = 0
    """Messages deleted from the queue (acknowledged, skipped, or poison with delete_poison)."""
    released: int = 0
    """Messages made visible again at once (poison for the redrive policy, or not taken in
    because the catcher stopped or closed)."""
    poisoned: dict[str, int] = field(default_factory=dead_letter_counts)
    """Receives of messages that could not be decoded, routed or mapped, by reason."""
    visibility_extensions: int = 0
    """Messages whose visibility timeout was renewed (each renewal counts)."""
    backpressure_pauses: int = 0
    """Times a receive loop waited for room in the batcher."""
    paused: bool = False
    """A receive loop is waiting for room now."""
    errors: int = 0
    """Failed SQS calls and failed entries of batch calls (each attempt counts)."""
    delete_failures: int = 0
    """Messages given up after ``delete_backoff`` (they will be received again)."""
    in_flight: int = 0
    """Messages received and not yet deleted or released (updated when read)."""
