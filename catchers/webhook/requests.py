"""A webhook request: its CloudEvents in whichever HTTP content mode, and its wait for the commit.

Flow: **HTTP request -> CloudEvent(s)** -> intake -> Target(s) + Ack -> batcher
-> Ack done -> **Waiter resolved** -> 200.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence

from aiohttp import web

from catchers.cloudevents import (
    BATCH_JSON,
    HTTP_PREFIX,
    STRUCTURED_JSON,
    CloudEvent,
    decode_batch,
    decode_binary,
    decode_structured,
)
from catchers.wire import DecodeError
from daemon.api import Ack


class Outcome(enum.Enum):
    """How a request's wait for its commit ended."""

    COMMITTED = "committed"
    TIMED_OUT = "timed out"
    CLOSED = "closed"


class Waiter:
    """Resolves when all acks of one request are done, or with False when closed first."""

    def __init__(self, acks: Sequence[Ack]) -> None:
        self.future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._remaining = len(acks)
        if not acks:
            self.future.set_result(True)
        for ack in acks:
            ack.add_done_callback(self._one_done)

    def _one_done(self, _ack: Ack) -> None:
        self._remaining -= 1
        if self._remaining == 0 and not self.future.done():
            self.future.set_result(True)

    def abandon(self) -> None:
        if not self.future.done():
            self.future.set_result(False)


def decode_request(request: web.Request, body: bytes) -> list[CloudEvent]:
    """The events of a request in whichever CloudEvents HTTP mode it uses."""
    content_type = request.headers.get("Content-Type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media.startswith("application/cloudevents-batch"):
        if media != BATCH_JSON:
            raise DecodeError(f"unsupported event batch format {media}")
        return decode_batch(body)
    if media.startswith("application/cloudevents"):
        if media != STRUCTURED_JSON:
            raise DecodeError(f"unsupported event format {media}")
        return [decode_structured(body)]
    if HTTP_PREFIX + "specversion" in request.headers:
        return [decode_binary(request.headers, body, HTTP_PREFIX, percent_decode=True)]
    raise DecodeError(
        "not a CloudEvent: send ce-* headers (binary mode) or Content-Type "
        f"{STRUCTURED_JSON} or {BATCH_JSON}"
    )
