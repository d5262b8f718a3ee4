"""The EC2 (and STS) API of one AWS manager, on aiobotocore, with errors the daemon understands.

Flow: collector -> **client** -> EC2 API; errors -> ProviderError / ProviderAuthError.

:class:`Ec2Api` opens one aiobotocore EC2 client per manager (credentials from
the standard AWS chain, the manager's region, optional ``endpoint_url``) and
offers the few calls the collector needs:

* :meth:`Ec2Api.call` for one request and :meth:`Ec2Api.pages` for a
  paginated listing (botocore's paginators follow ``NextToken``);
* every request is counted per operation in :attr:`Ec2Api.calls` (the
  figures of a refresh, and tests that check a targeted refresh never lists).

Retries are botocore's own (``max_attempts``, ``retry_mode``): throttling
(``RequestLimitExceeded``, ``Throttling``...), 5xx and connection errors are
retried with exponential backoff and jitter inside one call.  What is left
when they are exhausted is translated:

* refused credentials or permissions (``AuthFailure``, ``UnauthorizedOperation``,
  ``ExpiredToken``, no credentials found...) -> :class:`ProviderAuthError`
  (not retryable: the daemon keeps running and retries that manager slowly);
* throttling, 5xx, timeouts, connection errors -> retryable
  :class:`ProviderError` (throttling carries a ``retry_after`` hint);
* any other API error -> :class:`ProviderError` that is not retryable, with
  the operation, the code and AWS's message.

Callers that expect a "not found" code (an id the API no longer knows) pass
it in ``missing_ok`` and get None instead of an error.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncGenerator, Collection
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Final, Self

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore import exceptions as boto

from daemon.api import ProviderAuthError, ProviderError
from providers.aws.settings import AwsSettings

log = logging.getLogger(__name__)

AUTH_CODES: Final = frozenset(
    {
        "AuthFailure",
        "Blocked",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "OptInRequired",
        "PendingVerification",
        "SignatureDoesNotMatch",
        "UnauthorizedOperation",
        "UnrecognizedClientException",
        "AccessDenied",
        "AccessDeniedException",
        "InvalidAccessKeyId",
    }
)
THROTTLING_CODES: Final = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "EC2ThrottledException",
        "SlowDown",
    }
)
THROTTLED_RETRY_AFTER: Final = 30.0
"""Seconds the batcher waits before retrying a refresh that stayed throttled."""

_CREDENTIAL_ERRORS: Final = (
    boto.NoCredentialsError,
    boto.PartialCredentialsError,
    boto.CredentialRetrievalError,
    boto.TokenRetrievalError,
    boto.SSOError,
    boto.UnauthorizedSSOTokenError,
    boto.ProfileNotFound,
)
_TRANSIENT_ERRORS: Final = (boto.HTTPClientError, boto.ConnectionError)


class ThrottledError(ProviderError):
    """AWS kept throttling through every retry: wait a while before the next refresh."""

    retryable = True
    retry_after: float = THROTTLED_RETRY_AFTER
    """Read by the batcher's backoff (``daemon.pipeline.backoff.retry_after``)."""


class Ec2Api:
    """One manager's EC2 and STS clients (``async with`` opens and closes them)."""

    def __init__(self, manager: str, settings: AwsSettings) -> None:
        self.manager = manager
        self.settings = settings
        self.calls: Counter[str] = Counter()
        """Requests sent, per operation (each botocore retry counts once more)."""
        self.throttled = 0
        """Answers with a throttling error code or HTTP 429 (retried by botocore or not)."""
        self._stack: AsyncExitStack | None = None
        self._ec2: Any = None
        self._sts: Any = None

    async def __aenter__(self) -> Self:
        s = self.settings
        stack = AsyncExitStack()
        try:
            session = AioSession(profile=s.profile)
            config = AioConfig(
                retries={"total_max_attempts": s.max_attempts, "mode": s.retry_mode},
                connect_timeout=s.connect_timeout,
                read_timeout=s.read_timeout,
                max_pool_connections=10,
            )
            common: dict[str, Any] = {
                "region_name": s.region,
                "endpoint_url": s.endpoint_url,
                "config": config,
            }
            self._ec2 = await stack.enter_async_context(session.create_client("ec2", **common))
            self._sts = await stack.enter_async_context(session.create_client("sts", **common))
        except _CREDENTIAL_ERRORS as exc:
            await stack.aclose()
            raise ProviderAuthError(f"manager {self.manager}: AWS credentials: {exc}") from exc
        except BaseException:
            await stack.aclose()
            raise
        for client in (self._ec2, self._sts):
            client.meta.events.register("before-send", self._count)
            client.meta.events.register("needs-retry", self._count_throttle)
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._ec2 = self._sts = None
        if stack is not None:
            await stack.aclose()

    def _count(self, *, event_name: str = "", **_: Any) -> None:
        """Count a request about to be sent (``before-send.<service>.<Operation>``)."""
        operation = event_name.rpartition(".")[2]
        self.calls[_snake(operation)] += 1
        return None  # a value would replace the HTTP response

    def _count_throttle(self, *, response: Any = None, **_: Any) -> None:
        """Count a throttled answer (``needs-retry`` sees every answer before botocore's
        retry handler decides; ``response`` is ``(http_response, parsed)`` or None)."""
        if isinstance(response, tuple) and len(response) == 2:
            http, parsed = response
            code = parsed.get("Error", {}).get("Code", "") if isinstance(parsed, dict) else ""
            if code in THROTTLING_CODES or getattr(http, "status_code", 0) == 429:
                self.throttled += 1
        return None  # a value would decide the retry

    def api_stats(self) -> dict[str, int]:
        return {"requests": self.total_calls, "throttled": self.throttled}

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def _client(self, service: str) -> Any:
        client = self._ec2 if service == "ec2" else self._sts
        if client is None:
            raise RuntimeError(f"AWS connection of manager {self.manager} is not open")
        return client

    async def call(
        self,
        operation: str,
        *,
        service: str = "ec2",
        missing_ok: Collection[str] = (),
        **params: Any,
    ) -> dict[str, Any] | None:
        """One API request (botocore retries included); None for a ``missing_ok`` code."""
        method = getattr(self._client(service), operation)
        try:
            response: dict[str, Any] = await method(**params)
        except boto.ClientError as exc:
            if _code(exc) in missing_ok:
                return None
            raise self._translate(operation, exc) from exc
        except (*_CREDENTIAL_ERRORS, *_TRANSIENT_ERRORS) as exc:
            raise self._translate(operation, exc) from exc
        return response

    async def pages(
        self, operation: str, *, missing_ok: Collection[str] = (), **params: Any
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The pages of a paginated EC2 listing, fetched one at a time."""
        paginator = self._client("ec2").get_paginator(operation)
        iterator = paginator.paginate(**params).__aiter__()
        while True:
            try:
                page: dict[str, Any] = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except boto.ClientError as exc:
                if _code(exc) in missing_ok:
                    return
                raise self._translate(operation, exc) from exc
            except (*_CREDENTIAL_ERRORS, *_TRANSIENT_ERRORS) as exc:
                raise self._translate(operation, exc) from exc
            yield page

    def _translate(self, operation: str, exc: Exception) -> ProviderError:
        where = f"manager {self.manager}: {operation} in {self.settings.region}"
        if isinstance(exc, _CREDENTIAL_ERRORS):
            return ProviderAuthError(f"{where}: AWS credentials: {exc}")
        if isinstance(exc, _TRANSIENT_ERRORS):
            return ProviderError(f"{where}: {type(exc).__name__}: {exc}", retryable=True)
        assert isinstance(exc, boto.ClientError)
        code = _code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = exc.response.get("Error", {}).get("Message", "")
        text = f"{where}: {code} (HTTP {status}): {message}"
        if code in AUTH_CODES or status in (401, 403):
            return ProviderAuthError(text)
        if code in THROTTLING_CODES or status == 429:
            return ThrottledError(f"{text} (still throttled after retries)")
        if isinstance(status, int) and status >= 500:
            return ProviderError(text, retryable=True)
        return ProviderError(text, retryable=False)


def _snake(operation: str) -> str:
    """``DescribeInstances`` -> ``describe_instances`` (the client method's name)."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in operation).lstrip("_")


def _code(exc: boto.ClientError) -> str:
    code = exc.response.get("Error", {}).get("Code", "")
    return str(code)
