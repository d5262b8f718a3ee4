"""CloudEvents 1.0 decoding, independent of the transport.

Flow: **raw record / request -> CloudEvent** -> intake (route, event mapper) -> Target(s).

A catcher receives bytes and headers; this module turns them into
:class:`CloudEvent` values, or raises :class:`~catchers.wire.DecodeError` with a precise
reason (which the catcher writes on the dead-letter record).  It knows the
three CloudEvents 1.0 content modes and one non-CloudEvents mode:

* structured (``application/cloudevents+json``): the body is the event;
* binary: attributes in ``ce_`` (Kafka) / ``ce-`` (HTTP) headers, the body is
  the data, ``content-type`` is ``datacontenttype``;
* batch (``application/cloudevents-batch+json``): a JSON array of structured events;
* plain: provider JSON without an envelope; the whole JSON is the data and
  the event's :attr:`CloudEvent.mode` is :attr:`EventMode.PLAIN`.

Nothing here does I/O; the Kafka catcher and the webhook share it.  A Kafka
catcher decodes every record, so the binary mode path reads the headers once,
builds each event once, and parses each distinct ``time`` text once (a small
cache: a stream's events share their timestamps' seconds).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from urllib.parse import unquote

from catchers.wire import (
    DecodeError,
    Headers,
    HeaderValue,
    data_from_body,
    header_items,
    header_text,
    isoformat,
    json_type,
    load_json,
    media_type,
    parse_rfc3339,
    require_body,
)

SPECVERSION: Final = "1.0"
STRUCTURED_JSON: Final = "application/cloudevents+json"
BATCH_JSON: Final = "application/cloudevents-batch+json"
KAFKA_PREFIX: Final = "ce_"
HTTP_PREFIX: Final = "ce-"

_REQUIRED: Final = ("id", "source", "specversion", "type")
_OPTIONAL: Final = ("datacontenttype", "dataschema", "subject", "time")
_CONTEXT: Final = (*_REQUIRED, *_OPTIONAL)
_CONTEXT_SET: Final = frozenset(_CONTEXT)
_NON_EMPTY: Final = frozenset(("id", "source", "type", "subject"))
_KAFKA_SPECVERSION: Final = KAFKA_PREFIX + "specversion"
_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]+")


class EventMode(enum.Enum):
    """How the event arrived."""

    STRUCTURED = "structured"
    BINARY = "binary"
    PLAIN = "plain"
    """Provider JSON without a CloudEvents envelope."""


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """One decoded event.

    In :attr:`EventMode.PLAIN` mode ``specversion`` is None, ``type`` is empty
    and ``id`` / ``source`` are whatever the transport supplied (for Kafka:
    ``topic/partition/offset`` and ``kafka:topic``).
    """

    id: str
    source: str
    type: str
    specversion: str | None = SPECVERSION
    subject: str | None = None
    time: datetime | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    data: Any = None
    extensions: Mapping[str, Any] = field(default_factory=dict)
    mode: EventMode = EventMode.STRUCTURED

    @property
    def is_plain(self) -> bool:
        return self.mode is EventMode.PLAIN

    @property
    def timestamp(self) -> float | None:
        """``time`` as epoch seconds, or None."""
        return self.time.timestamp() if self.time is not None else None

    def to_dict(self) -> dict[str, Any]:
        """The event as the dict an ``EventMapper`` receives.

        The shape of the structured JSON format: the context attributes
        (``time`` as an RFC 3339 string, absent optional ones as None), the
        extensions as top-level keys, and ``data`` (bytes stay bytes).
        """
        time = self.time
        return {
            **self.extensions,
            "specversion": self.specversion,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": isoformat(time) if time is not None else None,
            "datacontenttype": self.datacontenttype,
            "dataschema": self.dataschema,
            "data": self.data,
        }


def decode_structured(body: bytes | str) -> CloudEvent:
    """Decode one event in the structured JSON format."""
    return _from_json_object(load_json(body), where="")


def decode_batch(body: bytes | str) -> list[CloudEvent]:
    """Decode a JSON batch: an array of structured events (possibly empty)."""
    document = load_json(body)
    if not isinstance(document, list):
        raise DecodeError(f"batch must be a JSON array, not {json_type(document)}")
    return [_from_json_object(item, where=f"batch item {i}: ") for i, item in enumerate(document)]


def decode_binary(
    headers: Headers,
    body: bytes | str | None,
    prefix: str = KAFKA_PREFIX,
    *,
    percent_decode: bool = False,
) -> CloudEvent:
    """Decode a binary-mode event: attributes in ``prefix`` headers, the body as data.

    Header names are matched case-insensitively.  ``percent_decode`` undoes
    the percent-encoding that the HTTP binding applies to header values.
    """
    prefix = prefix.lower()
    attributes: dict[str, Any] = {}
    content_type: str | None = None
    for name, raw in header_items(headers):
        lname = name.lower()
        if lname == "content-type":
            content_type = header_text(name, raw)
        elif lname.startswith(prefix):
            _set_binary_attribute(attributes, name, lname[len(prefix) :], raw, percent_decode)
    return _from_binary(attributes, content_type, body, prefix)


def decode_plain(body: bytes | str | None, *, id: str = "", source: str = "") -> CloudEvent:
    """Wrap provider JSON that has no CloudEvents envelope."""
    if body is None or len(body) == 0:
        raise DecodeError("empty body")
    return CloudEvent(
        id=id,
        source=source,
        type="",
        specversion=None,
        datacontenttype="application/json",
        data=load_json(body),
        mode=EventMode.PLAIN,
    )


def decode_kafka_record(
    headers: Headers,
    value: bytes | None,
    *,
    plain_id: str = "",
    plain_source: str = "",
) -> list[CloudEvent]:
    """Decode a Kafka record in whichever mode it uses.

    * ``content-type: application/cloudevents-batch+json`` -> batch;
    * ``content-type: application/cloudevents+json`` -> structured;
    * a ``ce_specversion`` header -> binary;
    * otherwise the value must be JSON: a JSON object with a ``specversion``
      member is a structured event (producers often omit the content-type
      header), anything else is a plain provider event.
    """
    pairs = header_items(headers)
    content_type = None
    binary = False
    attributes: dict[str, Any] = {}
    irregular = False
    """A ce_ header decode_binary would refuse: it, not this loop, must name the error."""
    roles = _KAFKA_HEADER_ROLES
    for name, raw in pairs:
        try:
            role = roles[name]
        except KeyError:
            role = _kafka_header_role(name)
        if role is _OTHER_HEADER:
            continue
        if role is _CONTENT_TYPE_HEADER:
            content_type = header_text(name, raw)
            continue
        if role == "specversion":
            binary = True
        if raw is None:
            continue
        if role == "data" or role == "data_base64":
            irregular = True
        elif isinstance(raw, str):
            attributes[role] = raw
        else:
            try:
                attributes[role] = raw.decode("utf-8")
            except UnicodeDecodeError:
                irregular = True
    media = media_type(content_type)
    if media.startswith("application/cloudevents-batch"):
        if media != BATCH_JSON:
            raise DecodeError(f"unsupported event batch format {media}")
        return decode_batch(require_body(value))
    if media.startswith("application/cloudevents"):
        if media != STRUCTURED_JSON:
            raise DecodeError(f"unsupported event format {media}")
        return [decode_structured(require_body(value))]
    if binary:
        if irregular:
            return [decode_binary(pairs, value, KAFKA_PREFIX)]  # raises the precise error
        return [_from_binary(attributes, content_type, value, KAFKA_PREFIX)]
    body = require_body(value)
    document = load_json(body)
    if isinstance(document, dict) and "specversion" in document:
        return [_from_json_object(document, where="")]
    return [decode_plain(body, id=plain_id, source=plain_source)]


# -- internals ---------------------------------------------------------------


class _Header(enum.Enum):
    """What a Kafka header is, when it is not a ``ce_`` attribute."""

    CONTENT_TYPE = "content-type"
    OTHER = "other"


_OTHER_HEADER: Final = _Header.OTHER
_CONTENT_TYPE_HEADER: Final = _Header.CONTENT_TYPE
_KAFKA_HEADER_ROLES: dict[str, str | _Header] = {}
"""Kafka header name -> the attribute of a ``ce_`` header (lower case, without the
prefix) or what else it is.  Producers use few header names: each is lower-cased
and split once, not once per record."""
_KAFKA_HEADER_ROLES_MAX: Final = 1024


def _kafka_header_role(name: str) -> str | _Header:
    lname = name.lower()
    role: str | _Header = _Header.OTHER
    if lname.startswith(KAFKA_PREFIX):
        role = lname[len(KAFKA_PREFIX) :]
    elif lname == "content-type":
        role = _Header.CONTENT_TYPE
    if len(_KAFKA_HEADER_ROLES) < _KAFKA_HEADER_ROLES_MAX:
        _KAFKA_HEADER_ROLES[name] = role
    return role


def _set_binary_attribute(
    attributes: dict[str, Any], name: str, attribute: str, raw: HeaderValue, percent_decode: bool
) -> None:
    """Record the attribute of one prefixed header (``attribute``: its name without the prefix)."""
    value = header_text(name, raw)
    if value is None:
        return
    if attribute in ("data", "data_base64"):
        raise DecodeError(f"header {name!r} is not a context attribute")
    attributes[attribute] = unquote(value) if percent_decode else value


def _from_binary(
    attributes: dict[str, Any], content_type: str | None, body: bytes | str | None, prefix: str
) -> CloudEvent:
    if "datacontenttype" in attributes:
        raise DecodeError(f"use content-type, not a {prefix}datacontenttype header")
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    present, extensions, time = _context(attributes, where="")
    return _event(present, extensions, time, data_from_body(body, content_type), EventMode.BINARY)


def _from_json_object(document: Any, *, where: str) -> CloudEvent:
    if not isinstance(document, dict):
        raise DecodeError(f"{where}event must be a JSON object, not {json_type(document)}")
    attributes = {k: v for k, v in document.items() if k not in ("data", "data_base64")}
    present, extensions, time = _context(attributes, where=where)
    has_data = document.get("data") is not None
    has_base64 = document.get("data_base64") is not None
    if has_data and has_base64:
        raise DecodeError(f"{where}both 'data' and 'data_base64' are present")
    data: Any = document.get("data")
    if has_base64:
        encoded = document["data_base64"]
        if not isinstance(encoded, str):
            raise DecodeError(f"{where}'data_base64' must be a string")
        try:
            data = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise DecodeError(f"{where}invalid base64 in 'data_base64': {exc}") from None
    return _event(present, extensions, time, data, EventMode.STRUCTURED)


def _context(
    attributes: Mapping[str, Any], *, where: str
) -> tuple[Mapping[str, Any], dict[str, Any], datetime | None]:
    """Validate context attributes (None counts as absent): the attributes present (their
    context attributes are valid strings), the extensions and the parsed ``time``, or
    DecodeError naming the first problem."""
    if None in attributes.values():
        attributes = {k: v for k, v in attributes.items() if v is not None}
    context = 0
    for name in attributes:
        if name in _CONTEXT_SET:
            context += 1
        elif not _ATTRIBUTE_NAME.fullmatch(name):
            raise DecodeError(f"{where}invalid attribute name {name!r}")
    for name in _REQUIRED:
        if name not in attributes:
            raise DecodeError(f"{where}missing required attribute {name!r}")
    specversion = attributes["specversion"]
    if specversion != SPECVERSION:
        raise DecodeError(f"{where}unsupported specversion {specversion}")
    for name in _CONTEXT:
        value = attributes.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise DecodeError(f"{where}attribute {name!r} must be a string, not {json_type(value)}")
        if not value and name in _NON_EMPTY:
            raise DecodeError(f"{where}attribute {name!r} must not be empty")
    extensions: dict[str, Any] = {}
    if context < len(attributes):
        for name, value in attributes.items():
            if name in _CONTEXT_SET:
                continue
            if type(value) in _EXTENSION_TYPES or isinstance(value, bool | int | str):
                extensions[name] = value
            else:
                raise DecodeError(
                    f"{where}extension {name!r} must be a string, integer or boolean, "
                    f"not {json_type(value)}"
                )
    text = attributes.get("time")
    return attributes, extensions, _parse_time(text, where) if text is not None else None


_EXTENSION_TYPES: Final = frozenset({bool, int, str})
"""What an extension attribute may be (a set: one hash lookup per value, no union object)."""


def _event(
    attributes: Mapping[str, Any],
    extensions: dict[str, Any],
    time: datetime | None,
    data: Any,
    mode: EventMode,
) -> CloudEvent:
    """The event of attributes :func:`_context` validated."""
    get = attributes.get
    return CloudEvent(
        attributes["id"],
        attributes["source"],
        attributes["type"],
        SPECVERSION,
        get("subject"),
        time,
        get("datacontenttype"),
        get("dataschema"),
        data,
        extensions,
        mode,
    )


def _parse_time(value: str, where: str) -> datetime:
    try:
        return parse_rfc3339(value)
    except DecodeError as exc:
        raise DecodeError(f"{where}{exc.reason}") from None
