"""The Kafka catcher's settings and counters: what a ``[[catchers]]`` block of type kafka holds.

Flow: ``[[catchers]] type = "kafka"`` -> **KafkaSettings** -> catchers.kafka.KafkaCatcher
-> **KafkaCatcherStats** -> daemon metrics.

Durations are seconds or strings with a unit (``"500ms"``, ``"5s"``, ``"1m"``),
like every duration of the daemon's config (``daemon.service.config.Duration``).
Unknown keys and incoherent timeouts are errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Self

from aiokafka.helpers import create_ssl_context
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from catchers.intake import dead_letter_counts
from daemon.api import CatcherStats, Duration, Secret


class KafkaSettings(BaseModel):
    """One Kafka catcher: a consumer group member reading ``topics``.

    Times are durations: seconds (``0.5``) or a string with a unit (``"500ms"``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: tuple[str, ...] = Field(min_length=1)
    """``host:port`` of brokers to bootstrap from (a comma-separated string is accepted)."""
    topics: tuple[str, ...] = Field(min_length=1)
    group_id: str
    group_instance_id: str | None = None
    """Static membership: a restart within ``session_timeout`` causes no rebalance."""
    client_id: str = "refreshd"
    name: str = "kafka"
    """The catcher's name in logs and in the ``refreshd-catcher`` dead-letter header."""
    dead_letter_topic: str | None = None
    """Where bad records go; None means ``<source topic>.dlq``."""
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    """Where a group without a committed offset starts."""
    max_poll_records: int = Field(500, ge=1)
    poll_timeout: Duration = Field(0.2, gt=0)
    """How long one ``getmany`` waits for records (also the pace of polls while paused)."""
    commit_interval: Duration = Field(1.0, gt=0)
    commit_timeout: Duration = Field(10.0, gt=0)
    """The time limit of one offset commit, and on revoke of the wait for in-flight acks
    before it (< rebalance timeout).  A commit past it counts as failed and is retried."""
    stall_timeout: Duration = Field(60.0, gt=0)
    """A catcher whose fetch loop has not completed a poll, or whose commits have all failed,
    for this long is unhealthy (``/healthz`` 503, no systemd watchdog ping)."""
    drain_timeout: Duration = 5.0
    """On close: how long to wait for in-flight acks before the final commit."""
    session_timeout: Duration = Field(10.0, gt=0)
    heartbeat_interval: Duration = Field(3.0, gt=0)
    max_poll_interval: Duration = Field(300.0, gt=0)
    rebalance_timeout: Duration | None = Field(None, gt=0)
    """How long the group waits for members to rejoin; None means ``max_poll_interval``."""
    dead_letter_backoff: tuple[Duration, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
    """Delays between attempts to produce a dead letter (the last one repeats)."""
    fetch_backoff: tuple[Duration, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    """Delays after retriable fetch errors (the last one repeats)."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    """A secret: ``{ value | env | file | credential }``."""
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @field_validator("bootstrap_servers", "topics", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("dead_letter_backoff", "fetch_backoff")
    @classmethod
    def _non_empty_backoff(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(delay < 0 for delay in value):
            raise ValueError("a backoff needs at least one delay, none negative")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.heartbeat_interval >= self.session_timeout:
            raise ValueError("heartbeat_interval must be shorter than session_timeout")
        rebalance = self.rebalance_timeout or self.max_poll_interval
        if self.commit_timeout >= rebalance:
            raise ValueError(
                f"commit_timeout ({self.commit_timeout}s) must be shorter than the rebalance"
                f" timeout ({rebalance}s): revoked partitions are committed within it"
            )
        if self.stall_timeout <= max(self.poll_timeout, self.commit_timeout):
            raise ValueError(
                f"stall_timeout ({self.stall_timeout}s) must be longer than poll_timeout and"
                f" commit_timeout ({self.commit_timeout}s)"
            )
        if self.sasl_mechanism is not None and not self.security_protocol.startswith("SASL"):
            raise ValueError("sasl_mechanism needs security_protocol SASL_PLAINTEXT or SASL_SSL")
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
        if self.sasl_mechanism is not None and (
            self.sasl_username is None or self.sasl_password is None
        ):
            raise ValueError(
                f"sasl_mechanism {self.sasl_mechanism} needs sasl_username and sasl_password"
            )
        return self

    def dead_letter_topic_for(self, topic: str) -> str:
        return self.dead_letter_topic or f"{topic}.dlq"

    def client_options(self) -> dict[str, Any]:
        """The aiokafka options that the consumer and the producer share (servers, security).

        Call it when starting: a TLS context reads its certificate files.
        """
        options: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        if self.sasl_mechanism is not None:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            if self.sasl_password is not None:
                options["sasl_plain_password"] = self.sasl_password.reveal()
        return options


def milliseconds(seconds: float) -> int:
    """A duration as the whole milliseconds aiokafka takes (at least 1)."""
    return max(int(seconds * 1000), 1)


@dataclass(slots=True)
class KafkaCatcherStats(CatcherStats):
    """The Kafka catcher's counters since start (``received``: records handed to the sink or
    dead-lettered, a re-read after QueueFull counts once; ``lag``, ``offset_resets`` and
    ``committed`` keyed by ``"topic/partition"``)."""

    dead_lettered: dict[str, int] = field(default_factory=dead_letter_counts)
    dead_letter_errors: int = 0
    """Failed attempts to produce a dead letter (each is retried)."""
    backpressure_pauses: int = 0
    paused: bool = False
    commits: int = 0
    commit_errors: int = 0
    committed: dict[str, int] = field(default_factory=dict)
    """Last committed position per partition."""
    full_refresh_requests: int = 0
    """Full refreshes asked for after offset resets (one per manager and reset)."""
    in_flight: int = 0
    """Records handed on and not yet acknowledged (updated when read)."""
