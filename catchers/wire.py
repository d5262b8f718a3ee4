"""Bytes and headers as the CloudEvents decoder reads them, and the error it raises.

Flow: raw record / request -> **JSON, text, header values, media types, RFC 3339 times**
-> catchers.cloudevents (CloudEvent) -> intake.

Leaf helpers of :mod:`catchers.cloudevents`: each either answers or raises
:class:`DecodeError` with the precise reason a catcher writes on its dead letter.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Final

_TIME_CACHE_SIZE: Final = 4096
_JSON: Final = json.JSONDecoder()
_JSON_OPENERS: Final = (b"{", b"[")
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})"
)

HeaderValue = bytes | str | None
Headers = Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]]
"""Transport headers: a mapping (HTTP) or a sequence of pairs (Kafka)."""


class DecodeError(ValueError):
    """The input is not a valid event; :attr:`reason` says precisely why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@functools.lru_cache(maxsize=_TIME_CACHE_SIZE)
def parse_rfc3339(value: str) -> datetime:
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise DecodeError(f"attribute 'time' is not an RFC 3339 timestamp: {value!r}")
    date, clock, fraction, offset = match.groups()
    fraction = f".{fraction[:6]}" if fraction else ""
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        return datetime.fromisoformat(f"{date}T{clock}{fraction}{offset}")
    except ValueError as exc:
        raise DecodeError(f"attribute 'time' is invalid: {exc}") from None


def data_from_body(body: bytes | str | None, content_type: str | None) -> Any:
    if body is None or len(body) == 0:
        return None
    media = media_type(content_type)
    if media == "application/json" or media.endswith("+json"):
        return load_json(body)
    if media.startswith("text/"):
        return body if isinstance(body, str) else utf8(body)
    if content_type is None:
        try:
            return load_json(body)
        except DecodeError:
            return body
    return body


def load_json(body: bytes | str) -> Any:
    try:
        if type(body) is bytes and body[:1] in _JSON_OPENERS and body[1:2] != b"\x00":
            # What json.loads does with these bytes, minus its encoding sniffing: a JSON
            # text opening with an ASCII bracket and no NUL after it is UTF-8.
            return _JSON.decode(body.decode("utf-8", "surrogatepass"))
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise DecodeError(f"invalid JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise DecodeError("invalid JSON: nested too deeply") from None


def require_body(value: bytes | None) -> bytes:
    if value is None or len(value) == 0:
        raise DecodeError("empty record value")
    return value


def header_items(headers: Headers) -> Iterable[tuple[str, HeaderValue]]:
    if type(headers) is tuple or type(headers) is list:  # Kafka: skip the ABC check
        return headers
    if isinstance(headers, Mapping):
        return headers.items()
    return list(headers)


def header_text(name: str, raw: HeaderValue) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"header {name!r} is not UTF-8") from None


def utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("text data is not UTF-8") from None


def media_type(content_type: str | None) -> str:
    if content_type is None:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


isoformat: Callable[[datetime], str] = functools.lru_cache(maxsize=_TIME_CACHE_SIZE)(
    datetime.isoformat
)
"""``time.isoformat()``, once per distinct time (``CloudEvent.to_dict`` runs for every event)."""
