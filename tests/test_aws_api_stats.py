"""The AWS provider counts its API requests and throttled answers (refreshd_provider_api_*)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from daemon.model.provider import ProviderError
from providers.aws import AwsConnection, AwsSettings

THROTTLED = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>RequestLimitExceeded'
    "</Code><Message>Request limit exceeded.</Message></Error></Errors>"
    "<RequestID>r-1</RequestID></Response>"
)


async def test_throttled_answers_are_counted(
    throttling_ec2: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    settings = AwsSettings(
        region="us-east-1",
        endpoint_url=throttling_ec2,
        account_id="123456789012",
        max_attempts=3,
    )
    async with AwsConnection("aws-throttled", settings) as connection:
        with pytest.raises(ProviderError, match="RequestLimitExceeded"):
            async for _ in connection.collect_full():
                pass
        # every attempt was sent and every answer asked to slow down
        assert connection.api_stats() == {"requests": 3, "throttled": 3}


@pytest.fixture
async def throttling_ec2() -> AsyncIterator[str]:
    """An EC2 endpoint that answers every request with RequestLimitExceeded (HTTP 503)."""

    async def throttle(_request: web.Request) -> web.Response:
        return web.Response(status=503, text=THROTTLED, content_type="text/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", throttle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
