"""Event delivery: the simulator pushes its CloudEvents to Kafka or to a webhook.

Flow: simulator mutation -> event log -> **delivery** -> Kafka topic / webhook -> refreshd catcher.

A delivery reads the cloud's event log with a cursor (``events_after``) and
sends every event, in order, retrying the transport until it is accepted, so a
slow or restarting receiver loses nothing.  ``drop_rate`` loses a share of
events on purpose (seeded), to exercise the periodic full refresh.

* Kafka: one record per event, key = the cloud's name (one partition per
  manager keeps order), CloudEvents *binary* mode (``ce_*`` headers, the
  event's data as the value) or *structured* mode (the whole event as JSON,
  ``content-type: application/cloudevents+json``).
* Webhook: batches of up to ``batch_size`` events as
  ``application/cloudevents-batch+json``, with an optional bearer token;
  503/5xx/connection errors are retried honouring ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from random import Random
from typing import Any, Literal, Protocol

import aiohttp
from aiokafka import AIOKafkaProducer

from providers.awesome_cloud.simulator.cloud import Cloud, CloudEvent

log = logging.getLogger(__name__)

Mode = Literal["binary", "structured"]


class Transport(Protocol):
    async def start(self) -> None: ...
    async def send(self, events: list[CloudEvent]) -> None: ...
    async def stop(self) -> None: ...


@dataclass(slots=True)
class DeliveryStats:
    delivered: int = 0
    dropped: int = 0
    retries: int = 0
    cursor: int = 0


def kafka_record(event: CloudEvent, mode: Mode) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of one event's Kafka record."""
    if mode == "structured":
        return (
            json.dumps(event).encode(),
            [("content-type", b"application/cloudevents+json")],
        )
    headers = [
        (f"ce_{k}", str(v).encode())
        for k, v in event.items()
        if k not in ("data", "datacontenttype") and v is not None
    ]
    headers.append(("content-type", str(event.get("datacontenttype", "application/json")).encode()))
    return json.dumps(event.get("data")).encode(), headers


class KafkaTransport:
    def __init__(self, bootstrap: str, topic: str, *, key: str, mode: Mode = "binary") -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        self._topic = topic
        self._key = key.encode()
        self._mode = mode

    async def start(self) -> None:
        await self._producer.start()

    async def send(self, events: list[CloudEvent]) -> None:
        futures = []
        for event in events:
            value, headers = kafka_record(event, self._mode)
            futures.append(
                await self._producer.send(self._topic, value=value, key=self._key, headers=headers)
            )
        await asyncio.gather(*futures)

    async def stop(self) -> None:
        await self._producer.stop()


class WebhookTransport:
    def __init__(self, url: str, *, token: str | None = None, timeout: float = 120.0) -> None:
        self._url = url
        self._headers = {"Content-Type": "application/cloudevents-batch+json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def send(self, events: list[CloudEvent]) -> None:
        assert self._session is not None, "start() first"
        async with self._session.post(
            self._url, data=json.dumps(events), headers=self._headers
        ) as resp:
            if resp.status == 200:
                return
            text = (await resp.text())[:200]
            retry_after = resp.headers.get("Retry-After")
            raise DeliveryError(
                f"webhook {self._url} answered {resp.status}: {text}",
                retry_after=float(retry_after) if retry_after else None,
                permanent=resp.status in (400, 401, 403, 404, 413),
            )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()


class DeliveryError(Exception):
    def __init__(
        self, message: str, *, retry_after: float | None = None, permanent: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent


@dataclass(slots=True)
class Delivery:
    """Reads ``cloud``'s event log from ``cursor`` and sends every event through ``transport``."""

    cloud: Cloud
    transport: Transport
    drop_rate: float = 0.0
    seed: int = 0
    batch_size: int = 100
    stats: DeliveryStats = field(default_factory=DeliveryStats)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, *, start_after: int | None = None) -> None:
        """Deliver until cancelled, starting after ``start_after`` (default: now)."""
        rng = Random(self.seed)
        self.stats.cursor = self.cloud.last_sequence if start_after is None else start_after
        unsubscribe = self.cloud.subscribe(lambda _event: self._wake.set())
        await self.transport.start()
        try:
            while True:
                page = self.cloud.events_after(self.stats.cursor, limit=self.batch_size)
                if not page.events:
                    self._wake.clear()
                    if self.cloud.last_sequence <= self.stats.cursor:
                        await self._wake.wait()
                    continue
                kept = [
                    e for e in page.events if not (self.drop_rate and rng.random() < self.drop_rate)
                ]
                self.stats.dropped += len(page.events) - len(kept)
                if kept:
                    await self._send_with_retry(kept)
                self.stats.delivered += len(kept)
                self.stats.cursor = page.last
        finally:
            unsubscribe()
            await self.transport.stop()

    async def _send_with_retry(self, events: list[CloudEvent]) -> None:
        delay = 0.2
        while True:
            try:
                await self.transport.send(events)
                return
            except asyncio.CancelledError:
                raise
            except DeliveryError as exc:
                if exc.permanent:
                    log.error("simulator delivery: %s; dropping %d event(s)", exc, len(events))
                    return
                wait = exc.retry_after or delay
                log.debug("simulator delivery: %s; retrying in %.1fs", exc, wait)
            except Exception as exc:  # noqa: BLE001 - any transport error: retry
                wait = delay
                log.debug("simulator delivery failed (%s); retrying in %.1fs", exc, wait)
            self.stats.retries += 1
            await asyncio.sleep(wait)
            delay = min(delay * 2, 5.0)


def delivery_options(parser: Any) -> None:
    """Add the delivery flags to ``refreshd simulator``'s argument parser."""
    parser.add_argument("--kafka-bootstrap", help="deliver events to this Kafka broker")
    parser.add_argument("--kafka-topic", default="awesome-events", help="topic (awesome-events)")
    parser.add_argument("--kafka-mode", choices=["binary", "structured"], default="binary")
    parser.add_argument("--webhook-url", help="deliver events to this refreshd webhook URL")
    parser.add_argument("--webhook-token", help="bearer token for the webhook")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="share of events to lose")


def deliveries_from_args(cloud: Cloud, args: Any) -> list[Delivery]:
    out: list[Delivery] = []
    if args.kafka_bootstrap:
        transport: Transport = KafkaTransport(
            args.kafka_bootstrap, args.kafka_topic, key=cloud.name, mode=args.kafka_mode
        )
        out.append(Delivery(cloud, transport, drop_rate=args.drop_rate, seed=args.seed))
    if args.webhook_url:
        out.append(
            Delivery(
                cloud,
                WebhookTransport(args.webhook_url, token=args.webhook_token),
                drop_rate=args.drop_rate,
                seed=args.seed,
            )
        )
    return out
