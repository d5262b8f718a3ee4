"""The SQS catcher's AWS side: the aiobotocore client, the queue's redrive policy, and
which errors are worth retrying.

Flow: catchers.sqs.SqsCatcher.start -> **open_client -> read_queue** -> receive loops,
which ask **classify** what a failed call means.

* Credentials come from the standard AWS chain (environment, shared profile,
  instance/task role); region from the settings, the queue URL, or the chain.
  botocore retries throttling, 5xx and connection errors itself
  (``retry_mode``); the catcher's loops add their own backoff on top.
* :func:`classify` sorts failures: :attr:`AwsFailure.FATAL` (the queue does
  not exist, access denied, no credentials or region: retrying cannot help,
  the catcher reports itself unhealthy) or :attr:`AwsFailure.RETRIABLE`
  (throttling, server errors, the network).  Anything else is a bug and propagates.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    InvalidRegionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    UnknownCredentialError,
)

from catchers.sqs.settings import SqsSettings

NONEXISTENT_QUEUE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
DENIED = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidSecurity",
        "KmsAccessDenied",
        "KMS.AccessDeniedException",
        "KmsDisabled",
        "KmsNotFound",
        "OptInRequired",
    }
)
"""Error codes no retry can cure: the credentials may not use this queue (or its key)."""
PARALLEL_CALLS = 8
"""Batch calls (renewals, deletes, releases) in flight at once: a backlog of acks or
renewals is cleared in parallel, not one round trip after the other."""
_FATAL_BOTOCORE = (
    NoCredentialsError,
    PartialCredentialsError,
    UnknownCredentialError,
    NoRegionError,
    InvalidRegionError,
)


class AwsFailure(enum.Enum):
    RETRIABLE = "retriable"
    FATAL = "fatal"


class SqsQueueError(RuntimeError):
    """The catcher cannot use its queue (missing, forbidden, no redrive policy, unreachable)."""


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """What the catcher needs to know about its queue."""

    max_receive_count: int | None
    """The redrive policy's maxReceiveCount; None when the queue has no redrive policy."""
    dead_letter_arn: str | None


def open_client(settings: SqsSettings) -> AbstractAsyncContextManager[Any]:
    """An SQS client on the AWS credential chain (use with ``async with``)."""
    config = AioConfig(
        retries={"mode": settings.retry_mode},
        read_timeout=settings.wait_time + 30,
        connect_timeout=10,
        max_pool_connections=settings.concurrency + PARALLEL_CALLS + 2,
    )
    client: AbstractAsyncContextManager[Any] = get_session().create_client(
        "sqs",
        region_name=settings.region_name(),
        endpoint_url=settings.endpoint_url,
        config=config,
    )
    return client


async def read_queue(client: Any, settings: SqsSettings) -> QueueInfo:
    """The queue's redrive policy; SqsQueueError when the queue cannot be used."""
    try:
        answer = await client.get_queue_attributes(
            QueueUrl=settings.queue_url, AttributeNames=["RedrivePolicy"]
        )
    except Exception as exc:
        if classify(exc) is None:
            raise
        raise SqsQueueError(explain(exc, settings)) from exc
    raw = answer.get("Attributes", {}).get("RedrivePolicy")
    if not raw:
        return QueueInfo(None, None)
    try:
        policy = json.loads(raw)
        return QueueInfo(int(policy["maxReceiveCount"]), str(policy.get("deadLetterTargetArn")))
    except (ValueError, TypeError, KeyError):
        raise SqsQueueError(
            f"sqs catcher {settings.name}: queue {settings.queue_name} has an unreadable "
            f"RedrivePolicy: {raw!r}"
        ) from None


def classify(exc: BaseException) -> AwsFailure | None:
    """What a failed SQS call means; None for anything that is not an AWS or network error."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        return AwsFailure.FATAL if code & (NONEXISTENT_QUEUE | DENIED) else AwsFailure.RETRIABLE
    if isinstance(exc, _FATAL_BOTOCORE):
        return AwsFailure.FATAL
    if isinstance(exc, BotoCoreError | aiohttp.ClientError | OSError | TimeoutError):
        return AwsFailure.RETRIABLE
    return None


def error_code(exc: BaseException) -> frozenset[str]:
    """The error codes of a ClientError (the JSON protocol's and the query-compatible one)."""
    error: Mapping[str, Any] = getattr(exc, "response", {}).get("Error", {})
    return frozenset(str(error[key]) for key in ("Code", "QueryErrorCode") if error.get(key))


def explain(exc: BaseException, settings: SqsSettings) -> str:
    """A message an operator can act on."""
    where = f"sqs catcher {settings.name}: queue {settings.queue_url}"
    codes = error_code(exc)
    if codes & NONEXISTENT_QUEUE:
        return f"{where} does not exist (check queue_url, region and endpoint_url)"
    if codes & DENIED:
        return (
            f"{where}: access denied ({exc}); the credentials of the AWS chain need "
            "sqs:ReceiveMessage, DeleteMessage, ChangeMessageVisibility and GetQueueAttributes"
        )
    if isinstance(exc, _FATAL_BOTOCORE):
        return f"{where}: {exc} (set up the AWS credential chain and region)"
    return f"{where}: {type(exc).__name__}: {exc}"
