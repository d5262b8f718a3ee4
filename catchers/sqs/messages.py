"""SQS message bodies -> CloudEvents -> Targets: the pure part of the SQS catcher.

Flow: **SQS message -> (SNS envelope unwrapped) -> CloudEvent** -> intake (route,
EventMapper) -> Target(s) -> batcher.

What a body may be:

* JSON with a ``specversion`` member: a structured CloudEvent;
* any other JSON (EventBridge events, provider JSON): a plain event whose
  ``id`` is the SQS MessageId and whose ``source`` is ``sqs:<queue name>``;
* either of those inside an SNS envelope (``Type == "Notification"`` with a
  string ``Message``: SNS -> SQS delivery without raw delivery), unwrapped first.

Event time (``Ack.event_time``): the CloudEvent's ``time``, an EventBridge
event's top-level ``time``, else the message's ``SentTimestamp``.

:func:`map_message` does no I/O and keeps no state: a message either maps to
its targets, or to a :class:`~catchers.intake.EventRejection` saying why it is
poison (routing and mapping are :mod:`catchers.intake`'s).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from catchers.cloudevents import CloudEvent, decode_plain, decode_structured
from catchers.intake import EventRejection, map_event, undecodable
from catchers.routing import Route
from catchers.wire import DecodeError
from daemon.api import Target


@dataclass(frozen=True, slots=True)
class Mapped:
    """The targets of a message, and when the cloud stamped its event (epoch seconds)."""

    targets: list[Target]
    event_time: float | None


def decode_message(
    message: Mapping[str, Any], *, queue_name: str
) -> tuple[CloudEvent, float | None]:
    """The event of an SQS message and its event time; DecodeError when it is not one."""
    body = message.get("Body")
    if not isinstance(body, str) or not body:
        raise DecodeError("empty message body")
    document = _load(body, what="body")
    if _is_sns_notification(document):
        body = document["Message"]
        document = _load(body, what="SNS Message")
    if isinstance(document, dict) and "specversion" in document:
        event = decode_structured(body)
        return event, event.timestamp if event.time is not None else _sent(message)
    event = decode_plain(body, id=str(message.get("MessageId", "")), source=f"sqs:{queue_name}")
    return event, _eventbridge_time(document) or _sent(message)


def map_message(
    route: Route, stream: str, message: Mapping[str, Any], *, queue_name: str
) -> Mapped | EventRejection:
    """Decode one message and take its event through the intake (``stream``: the queue URL
    the route sees)."""
    try:
        event, event_time = decode_message(message, queue_name=queue_name)
    except DecodeError as exc:
        return undecodable(exc)
    targets = map_event(route, stream, event)
    if isinstance(targets, EventRejection):
        return targets
    return Mapped(targets, event_time)


def _load(text: str, *, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise DecodeError(f"{what} is not JSON: nested too deeply") from None


def _is_sns_notification(document: Any) -> bool:
    return (
        isinstance(document, dict)
        and document.get("Type") == "Notification"
        and isinstance(document.get("Message"), str)
    )


def _eventbridge_time(document: Any) -> float | None:
    """The top-level ``time`` of an EventBridge event (it has ``detail-type`` and ``detail``)."""
    if not isinstance(document, dict) or "detail-type" not in document or "detail" not in document:
        return None
    text = document.get("time")
    if not isinstance(text, str):
        return None
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)).timestamp()


def _sent(message: Mapping[str, Any]) -> float | None:
    """``SentTimestamp`` (epoch milliseconds) as epoch seconds."""
    attributes = message.get("Attributes")
    raw = attributes.get("SentTimestamp") if isinstance(attributes, Mapping) else None
    try:
        return int(raw) / 1000.0 if raw is not None else None
    except (TypeError, ValueError):
        return None
