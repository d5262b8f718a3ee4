"""The webhook catcher over a real HTTP server, feeding the real Batcher.

The refresh behind the batcher is a gate the test opens: a request that is
still unanswered while its refresh is held, and answered 200 once the gate
opens, proves "200 only after commit".  No test sleeps to wait for
behaviour: every wait is on an event or a condition, under a timeout.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from catchers.webhook.catcher import WebhookCatcher, create
from daemon.model.catcher import CatcherContext, ManagerEndpoint
from daemon.model.targets import TargetCollection
from daemon.pipeline.batcher import Batcher, BatchingSettings
from providers.awesome_cloud.events import map_event

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
FIXTURES = Path(__file__).parent / "fixtures" / "events" / "awesome_cloud"
WAIT = 5.0


class GatedRefresh:
    """Records every TargetCollection; each refresh waits until the gate is open."""

    def __init__(self) -> None:
        self.calls: list[TargetCollection] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self._called = asyncio.Condition()

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    async def __call__(self, collection: TargetCollection) -> None:
        async with self._called:
            self.calls.append(collection)
            self._called.notify_all()
        await self.gate.wait()

    async def wait_calls(self, n: int) -> None:
        async with asyncio.timeout(WAIT), self._called:
            await self._called.wait_for(lambda: len(self.calls) >= n)

    def refs(self) -> set[str]:
        return {str(t) for c in self.calls for t in c}


@dataclass
class Harness:
    catcher: WebhookCatcher
    client: TestClient[web.Request, web.Application]
    batcher: Batcher
    refresh: GatedRefresh
    tasks: list[asyncio.Task[ClientResponse]] = field(default_factory=list)

    async def post(
        self, body: Any, *, content_type: str = STRUCTURED, headers: dict[str, str] | None = None
    ) -> ClientResponse:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        all_headers = {**AUTH, "Content-Type": content_type, **(headers or {})}
        return await self.client.post(self.catcher_path, data=data, headers=all_headers)

    def post_soon(self, body: Any, **kwargs: Any) -> asyncio.Task[ClientResponse]:
        task = asyncio.create_task(self.post(body, **kwargs))
        self.tasks.append(task)
        return task

    catcher_path: str = "/events"


Make = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    opened: list[Harness] = []

    async def build(
        options: dict[str, Any] | None = None,
        *,
        settings: BatchingSettings | None = None,
        token: str | None = TOKEN,
    ) -> Harness:
        refresh = GatedRefresh()
        batcher = Batcher(refresh, settings=settings or BatchingSettings(debounce=0.0))
        app = web.Application()
        context = CatcherContext(
            sink=batcher,
            managers={
                name: ManagerEndpoint(name, "awesome_cloud", map_event)
                for name in ("awesome", "other")
            },
            clock=asyncio.get_running_loop().time,
            http_app=app,
            token=token,
        )
        catcher = create(options if options is not None else {"manager": "awesome"}, context)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        batcher.start()
        await catcher.start()
        harness = Harness(catcher, client, batcher, refresh)
        harness.catcher_path = (options or {}).get("path", "/events")
        opened.append(harness)
        return harness

    yield build
    for h in opened:
        h.refresh.release()
        await h.catcher.close()
        for task in h.tasks:
            if not task.done():
                task.cancel()
        if h.tasks:
            await asyncio.wait(h.tasks)
        await h.client.close()
        await h.batcher.close(cancel=True)


def event(
    subject: str | None = "vm-000001",
    *,
    kind: str = "vm",
    action: str = "updated",
    source: str = "awesome",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"evt-{kind}-{subject}-{action}",
        "source": source,
        "type": f"com.awesomecloud.{kind}.{action}",
        "subject": subject,
        "time": "2024-05-01T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {"id": subject},
        **extra,
    }


def binary_headers(e: dict[str, Any]) -> dict[str, str]:
    headers = {f"ce-{k}": str(v) for k, v in e.items() if k not in ("data", "datacontenttype")}
    headers["Content-Type"] = "application/json"
    return headers


async def answered(task: asyncio.Task[ClientResponse]) -> ClientResponse:
    async with asyncio.timeout(WAIT):
        return await task


async def json_of(response: ClientResponse) -> dict[str, Any]:
    body: dict[str, Any] = await response.json()
    return body


# -- authentication -------------------------------------------------------------------


async def test_no_token_or_a_wrong_one_gets_401_and_queues_nothing(make: Make) -> None:
    h = await make()
    body = json.dumps(event())

    no_token = await h.client.post("/events", data=body, headers={"Content-Type": STRUCTURED})
    wrong = await h.client.post(
        "/events",
        data=body,
        headers={"Content-Type": STRUCTURED, "Authorization": "Bearer nope"},
    )
    basic = await h.client.post(
        "/events",
        data=body,
        headers={"Content-Type": STRUCTURED, "Authorization": f"Basic {TOKEN}"},
    )

    assert [no_token.status, wrong.status, basic.status] == [401, 401, 401]
    assert no_token.headers["WWW-Authenticate"].startswith("Bearer")
    assert h.batcher.stats.targets_enqueued == 0
    assert h.catcher.stats().unauthorized == 3


async def test_the_token_option_overrides_the_http_token(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBHOOK_TOKEN", "from-env")
    h = await make({"manager": "awesome", "token": {"env": "WEBHOOK_TOKEN"}})

    refused = await h.post(event())  # the [http] token
    accepted = await h.post(event(), headers={"Authorization": "Bearer from-env"})

    assert (refused.status, accepted.status) == (401, 200)


async def test_without_any_token_the_webhook_is_open(make: Make) -> None:
    h = await make(token=None)

    response = await h.client.post(
        "/events", data=json.dumps(event()), headers={"Content-Type": STRUCTURED}
    )

    assert response.status == 200


# -- accepted content modes ---------------------------------------------------------------


async def test_binary_event_is_answered_only_after_its_target_is_committed(make: Make) -> None:
    h = await make()
    h.refresh.hold()
    e = event("vm-000042")

    task = h.post_soon(json.dumps(e["data"]), headers=binary_headers(e), content_type="")
    await h.refresh.wait_calls(1)

    assert not task.done()
    assert h.refresh.refs() == {"awesome:vms:vm-000042"}
    (target,) = h.refresh.calls[0]
    assert target.event_id == e["id"]

    h.refresh.release()
    response = await answered(task)
    assert response.status == 200
    assert await json_of(response) == {"status": "committed", "events": 1, "targets": 1}


async def test_structured_event_from_a_recorded_payload(make: Make) -> None:
    h = await make()
    payload = (FIXTURES / "vm_updated_disk_attached.json").read_text()

    response = await h.post(payload)

    assert response.status == 200
    assert h.refresh.refs() == {"awesome:vms:vm-000004"}


async def test_batch_answers_after_all_of_its_events_are_committed(make: Make) -> None:
    h = await make()
    h.refresh.hold()
    batch = [
        event("vm-000001"),
        event("image-01", kind="image", action="created"),
        event("flavor-02", kind="flavor", action="deleted"),
        event("sg-03", kind="security_group"),
    ]

    task = h.post_soon(batch, content_type=BATCH)
    await h.refresh.wait_calls(1)
    assert not task.done()
    h.refresh.release()
    response = await answered(task)

    assert response.status == 200
    assert await json_of(response) == {"status": "committed", "events": 4, "targets": 4}
    assert h.refresh.refs() == {
        "awesome:vms:vm-000001",
        "awesome:images:image-01",
        "awesome:flavors:flavor-02",
        "awesome:security_groups:sg-03",
    }
    assert h.catcher.stats().submitted == 4


async def test_empty_batch_and_skipped_events_are_answered_at_once(make: Make) -> None:
    h = await make()
    h.refresh.hold()

    empty = await h.post([], content_type=BATCH)
    unknown = await h.post(event(kind="account"))

    assert (empty.status, unknown.status) == (200, 200)
    assert await json_of(unknown) == {"status": "committed", "events": 1, "targets": 0}
    assert h.refresh.calls == []
    assert h.catcher.stats().skipped == 1


async def test_routes_send_each_source_to_its_manager(make: Make) -> None:
    h = await make({"routes": {"east": "awesome", "west": "other"}, "path": "/hooks/cloud"})

    response = await h.post(
        [event("vm-1", source="east"), event("vm-2", source="west")], content_type=BATCH
    )

    assert response.status == 200
    assert h.refresh.refs() == {"awesome:vms:vm-1", "other:vms:vm-2"}


async def test_manager_catches_what_routes_do_not_claim(make: Make) -> None:
    h = await make({"routes": {"west": "other"}, "manager": "awesome"})

    response = await h.post(
        [event("vm-1", source="anywhere"), event("vm-2", source="west")], content_type=BATCH
    )

    assert response.status == 200
    assert h.refresh.refs() == {"awesome:vms:vm-1", "other:vms:vm-2"}


# -- refused requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        ('{"specversion": "1.0", "id": ', STRUCTURED, "invalid JSON"),
        (json.dumps({k: v for k, v in event().items() if k != "source"}), STRUCTURED, "'source'"),
        (json.dumps(event()), "application/json", "not a CloudEvent"),
        (json.dumps(event()), "application/cloudevents+xml", "unsupported event format"),
        (json.dumps(event()), BATCH, "batch must be a JSON array"),
        (json.dumps(event(type="com.other.vm.updated")), STRUCTURED, "not an AwesomeCloud event"),
        (json.dumps(event(subject=None)), STRUCTURED, "has no subject"),
    ],
)
async def test_malformed_events_get_400_with_the_reason(
    make: Make, body: str, content_type: str, reason: str
) -> None:
    h = await make()

    response = await h.post(body, content_type=content_type)

    assert response.status == 400
    assert reason in (await json_of(response))["error"]
    assert h.batcher.stats.targets_enqueued == 0


async def test_an_unroutable_event_gets_400(make: Make) -> None:
    h = await make({"routes": {"east": "awesome"}})

    response = await h.post(event(source="nowhere"))

    assert response.status == 400
    assert "no manager for source 'nowhere'" in (await json_of(response))["error"]
    assert h.catcher.stats().dead_lettered["unroutable"] == 1


async def test_one_bad_event_rejects_the_whole_batch(make: Make) -> None:
    h = await make()

    response = await h.post([event("vm-1"), event("vm-2", type="com.other.x")], content_type=BATCH)

    assert response.status == 400
    assert "batch item 1" in (await json_of(response))["error"]
    assert h.batcher.stats.targets_enqueued == 0


async def test_oversize_body_gets_413(make: Make) -> None:
    h = await make({"manager": "awesome", "max_body_bytes": 200})

    response = await h.post(event(data={"id": "vm-1", "padding": "x" * 500}))

    assert response.status == 413
    assert h.batcher.stats.targets_enqueued == 0


async def test_oversize_chunked_body_gets_413(make: Make) -> None:
    h = await make({"manager": "awesome", "max_body_bytes": 1000})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 200

    response = await h.client.post(
        "/events", data=chunks(), headers={**AUTH, "Content-Type": STRUCTURED}
    )

    assert response.status == 413
    assert h.catcher.stats().too_large == 1


async def test_a_mapper_bug_gets_500(make: Make) -> None:
    refresh = GatedRefresh()
    app = web.Application()

    def broken(manager: str, e: dict[str, Any]) -> list[Any]:
        raise KeyError("oops")

    async with Batcher(refresh) as batcher:
        context = CatcherContext(
            sink=batcher,
            managers={"m": ManagerEndpoint("m", "p", broken)},
            clock=asyncio.get_running_loop().time,
            http_app=app,
        )
        catcher = create({"manager": "m"}, context)
        await catcher.start()
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            response = await client.post(
                "/events", data=json.dumps(event()), headers={"Content-Type": STRUCTURED}
            )
            assert response.status == 500
            assert "oops" in (await response.json())["error"]
        await catcher.close()


# -- backpressure, time limit and shutdown ----------------------------------------------------


async def test_503_with_retry_after_when_the_batcher_is_full(make: Make) -> None:
    h = await make(settings=BatchingSettings(debounce=0.0, max_pending_targets=1))
    h.refresh.hold()
    first = h.post_soon(event("vm-1"))
    await h.refresh.wait_calls(1)  # vm-1 is refreshing, nothing pending
    second = h.post_soon(event("vm-2"))  # pending for the next batch: the queue is full
    async with asyncio.timeout(WAIT):
        while h.batcher.pending_count() < 1:
            await asyncio.sleep(0.01)

    refused = await h.post(event("vm-3"))
    refused_batch = await h.post([event("vm-4"), event("vm-5")], content_type=BATCH)

    for response in (refused, refused_batch):
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert "full" in (await json_of(response))["error"]
    h.refresh.release()
    assert (await answered(first)).status == 200
    assert (await answered(second)).status == 200
    assert h.refresh.refs() == {"awesome:vms:vm-1", "awesome:vms:vm-2"}
    assert h.catcher.stats().busy == 2


async def test_not_committed_within_max_wait_gets_503_and_the_targets_stay_queued(
    make: Make,
) -> None:
    h = await make({"manager": "awesome", "max_wait": "50ms", "retry_after": 7})
    h.refresh.hold()

    response = await h.post(event("vm-9"))

    assert response.status == 503
    assert response.headers["Retry-After"] == "7"
    assert "max_wait" in (await json_of(response))["error"]
    assert h.refresh.refs() == {"awesome:vms:vm-9"}  # still being refreshed
    assert h.catcher.stats().timed_out == 1


async def test_after_stop_new_requests_get_503_and_waiting_ones_still_get_their_200(
    make: Make,
) -> None:
    h = await make()
    h.refresh.hold()
    waiting = h.post_soon(event("vm-1"))
    await h.refresh.wait_calls(1)

    await h.catcher.stop()
    late = await h.post(event("vm-2"))

    assert late.status == 503
    assert late.headers["Retry-After"] == "5"
    assert not waiting.done()
    h.refresh.release()
    assert (await answered(waiting)).status == 200
    assert h.refresh.refs() == {"awesome:vms:vm-1"}


async def test_close_answers_waiting_requests_503_so_the_sender_retries(make: Make) -> None:
    h = await make()
    h.refresh.hold()
    waiting = h.post_soon([event("vm-1"), event("vm-2")], content_type=BATCH)
    await h.refresh.wait_calls(1)
    await h.catcher.stop()
    assert not waiting.done()

    await h.catcher.close()
    response = await answered(waiting)

    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert "shutting down" in (await json_of(response))["error"]
    assert not h.catcher.healthy()
    assert h.catcher.stats().closed_waiting == 1


async def test_requests_before_start_get_503(make: Make) -> None:
    refresh = GatedRefresh()
    app = web.Application()
    async with Batcher(refresh) as batcher:
        context = CatcherContext(
            sink=batcher,
            managers={"awesome": ManagerEndpoint("awesome", "awesome_cloud", map_event)},
            clock=asyncio.get_running_loop().time,
            http_app=app,
        )
        catcher = create({"manager": "awesome"}, context)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            response = await client.post(
                "/events", data=json.dumps(event()), headers={"Content-Type": STRUCTURED}
            )
            assert response.status == 503
        await catcher.close()


# -- options and stats -----------------------------------------------------------------------


def _context(app: web.Application | None = None) -> CatcherContext:
    class NoSink:
        def submit(self, targets: Any, ack: Any) -> None: ...
        def has_room(self) -> bool:
            return True

        async def wait_for_room(self) -> None: ...

    return CatcherContext(
        sink=NoSink(),
        managers={"awesome": ManagerEndpoint("awesome", "awesome_cloud", map_event)},
        clock=lambda: 0.0,
        http_app=app,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "give manager and/or routes"),
        ({"manager": "nope"}, "unknown manager 'nope'"),
        ({"routes": {"east": "nope"}}, "unknown manager 'nope'"),
        ({"manager": "awesome", "colour": "red"}, "colour"),
        ({"manager": "awesome", "path": "events"}, "path must start with '/'"),
        ({"manager": "awesome", "max_wait": 0}, "max_wait"),
        ({"manager": "awesome", "token": {"value": "a", "env": "B"}}, "exactly one"),
        ({"manager": "awesome", "token": {"env": "REFRESHD_TEST_UNSET_TOKEN"}}, "not set"),
    ],
)
def test_bad_options_raise_value_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create(options, _context(web.Application()))


def test_needs_the_http_app() -> None:
    with pytest.raises(ValueError, match="HTTP endpoint"):
        create({"manager": "awesome"}, _context(None))


def test_two_webhooks_cannot_share_a_path() -> None:
    app = web.Application()
    create({"manager": "awesome"}, _context(app))
    with pytest.raises(ValueError, match="cannot add POST /events"):
        create({"manager": "awesome", "name": "second"}, _context(app))


async def test_stats_count_what_happened(make: Make) -> None:
    h = await make()

    await h.post(event("vm-1"))
    await h.post("not json")
    await h.post([event("vm-2"), event(kind="account")], content_type=BATCH)

    stats = h.catcher.stats()
    assert stats.received == 4
    assert stats.decoded == 3
    assert stats.skipped == 1
    assert stats.dead_lettered == {"undecodable": 1, "unroutable": 0, "mapper_error": 0}
    assert stats.committed == 2
    assert h.catcher.healthy()
