"""HTTP client of the AwesomeCloud read API, with retries.

Flow: collector -> **client** -> AwesomeCloud (or the simulator) -> client -> parser.

One :class:`AwesomeClient` (one ``aiohttp.ClientSession``) per manager
connection.  Guarantees:

- 429, 408, 5xx, timeouts and connection errors are retried up to
  ``settings.retries`` times.  The wait is the server's ``Retry-After`` (seconds
  or HTTP date, on 429/503) when it sent one, at most ``retry_after_max`` (a
  server asking for 600 s cannot stall a manager for 10 minutes), else an
  exponential backoff ``min(backoff_max, backoff_initial * 2**n)`` with equal
  jitter (half fixed, half random).  When retries run out:
  ``ProviderError(retryable=True)``.
- 401/403 raise ``ProviderAuthError``; any other 4xx, a body that is not the
  expected JSON, or a listing whose page token does not advance raise
  ``ProviderError(retryable=False)``.  Every message names the URL and status.
- ``asyncio.CancelledError`` always propagates.  Retries log at debug, giving
  up at warning, each line naming the manager.
- The sleep function and the jitter's random generator are injected, so tests
  record the waits instead of waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from random import Random
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlencode

import aiohttp

from daemon.api import ProviderAuthError, ProviderError
from providers.awesome_cloud.settings import AwesomeCloudSettings

log = logging.getLogger(__name__)

ApiObject = dict[str, Any]
Sleep = Callable[[float], Awaitable[None]]

RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
RETRY_AFTER_STATUSES = frozenset({429, 503})
API_PREFIX = "/api/v1/"


class _RetryableFailure(Exception):
    """One failed attempt that another attempt may fix."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class AwesomeClient:
    """The read API of one AwesomeCloud endpoint (``async with`` opens the session)."""

    def __init__(
        self,
        endpoint: str,
        settings: AwesomeCloudSettings,
        *,
        manager: str,
        sleep: Sleep = asyncio.sleep,
        rng: Random | None = None,
    ) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._settings = settings
        self._manager = manager
        self._sleep = sleep
        self._rng = rng or Random()
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0
        """Requests sent (each retry counts)."""
        self.throttled = 0
        """Answers that asked to slow down (HTTP 429)."""

    async def __aenter__(self) -> Self:
        if self._session is None:
            headers = {"Accept": "application/json"}
            if self._settings.token is not None:
                headers["Authorization"] = f"Bearer {self._settings.token.reveal()}"
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._settings.request_timeout),
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- the read API ----------------------------------------------------------------

    async def get_page(
        self, collection: str, *, limit: int, page_token: str | None = None
    ) -> tuple[list[ApiObject], str | None]:
        """One page of ``collection`` and the token of the next (None after the last)."""
        params = {"limit": str(limit)}
        if page_token:
            params["page_token"] = page_token
        payload = await self.get_json(API_PREFIX + collection, params)
        token = payload.get("next_page_token")
        if token is not None and not isinstance(token, str):
            raise self._unexpected(collection, params, "next_page_token is not a string")
        return self._items(payload, collection, params), token or None

    async def iter_pages(
        self, collection: str, *, page_size: int
    ) -> AsyncGenerator[list[ApiObject]]:
        """Every object of ``collection``, one page at a time (never the whole listing)."""
        token: str | None = None
        while True:
            items, next_token = await self.get_page(collection, limit=page_size, page_token=token)
            yield items
            if next_token is None:
                return
            if next_token == token:
                raise self._unexpected(collection, {}, f"page token {token!r} did not advance")
            token = next_token

    async def iter_by_ids(
        self, collection: str, ids: Iterable[str], *, chunk_size: int
    ) -> AsyncGenerator[list[ApiObject], None]:
        """The objects of ``collection`` with these ids, ``chunk_size`` ids per request.

        Ids the cloud does not have are absent.  Never lists the collection.
        """
        wanted = sorted(set(ids))
        for start in range(0, len(wanted), chunk_size):
            params = {"ids": ",".join(wanted[start : start + chunk_size])}
            payload = await self.get_json(API_PREFIX + collection, params)
            yield self._items(payload, collection, params)

    # -- one GET with retries ----------------------------------------------------------

    async def get_json(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """GET ``path`` and decode its JSON object, retrying what may succeed later."""
        url = self._endpoint + path
        attempts = self._settings.retries + 1
        for attempt in range(attempts):
            try:
                return await self._attempt(url, params)
            except _RetryableFailure as failure:
                where = _describe(url, params)
                if attempt + 1 >= attempts:
                    log.warning(
                        "manager %s: giving up on GET %s after %d attempts: %s",
                        self._manager,
                        where,
                        attempts,
                        failure,
                    )
                    raise ProviderError(
                        f"GET {where} failed after {attempts} attempts: {failure}",
                        retryable=True,
                    ) from failure
                delay = failure.retry_after
                if delay is None:
                    delay = self._backoff(attempt)
                elif delay > self._settings.retry_after_max:
                    log.info(
                        "manager %s: GET %s: Retry-After %.0fs capped to retry_after_max %.0fs",
                        self._manager,
                        where,
                        delay,
                        self._settings.retry_after_max,
                    )
                    delay = self._settings.retry_after_max
                log.debug(
                    "manager %s: GET %s failed (%s); retry %d/%d in %.2fs",
                    self._manager,
                    where,
                    failure,
                    attempt + 1,
                    attempts - 1,
                    delay,
                )
                await self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int) -> float:
        s = self._settings
        base = min(s.backoff_max, s.backoff_initial * 2.0**attempt)
        return base / 2 + self._rng.uniform(0, base / 2)

    async def _attempt(self, url: str, params: dict[str, str]) -> dict[str, Any]:
        if self._session is None:
            raise RuntimeError("AwesomeClient used outside 'async with'")
        self.requests += 1
        try:
            async with self._session.get(url, params=params) as resp:
                status, body, headers = resp.status, await resp.read(), resp.headers
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise _RetryableFailure(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        except aiohttp.ClientError as exc:
            raise ProviderError(
                f"GET {_describe(url, params)}: {type(exc).__name__}: {exc}", retryable=False
            ) from exc
        if status == 200:
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                raise ProviderError(
                    f"GET {_describe(url, params)} -> 200 but the body is not a JSON object",
                    retryable=False,
                )
            return payload
        message = f"HTTP {status}{_server_message(body)}"
        if status == 429:
            self.throttled += 1
        if status in RETRYABLE_STATUSES:
            retry_after = None
            if status in RETRY_AFTER_STATUSES:
                retry_after = _parse_retry_after(headers.get("Retry-After"))
            raise _RetryableFailure(message, retry_after=retry_after)
        error_type = ProviderAuthError if status in (401, 403) else ProviderError
        raise error_type(f"GET {_describe(url, params)} -> {message}", retryable=False)

    def _items(
        self, payload: dict[str, Any], collection: str, params: dict[str, str]
    ) -> list[ApiObject]:
        items = payload.get("items")
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise self._unexpected(collection, params, "'items' is not a list of objects")
        return items

    def _unexpected(self, collection: str, params: dict[str, str], what: str) -> ProviderError:
        url = _describe(self._endpoint + API_PREFIX + collection, params)
        return ProviderError(f"GET {url}: unexpected response: {what}", retryable=False)


def _describe(url: str, params: dict[str, str], limit: int = 200) -> str:
    text = f"{url}?{urlencode(params)}" if params else url
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _server_message(body: bytes) -> str:
    """``: <message>`` from an ``{"error": {"message": ...}}`` body, or the body's start."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace").strip()
    return f": {message}" if message else ""


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
