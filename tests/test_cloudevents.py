"""CloudEvents decoding: structured, binary, batch and plain modes, and precise errors."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from catchers.cloudevents import (
    CloudEvent,
    EventMode,
    decode_batch,
    decode_binary,
    decode_kafka_record,
    decode_plain,
    decode_structured,
)
from catchers.wire import DecodeError


def structured(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/aws/ec2/us-east-1",
        "type": "com.amazon.ec2.instance.state",
        "time": "2024-05-01T10:20:30.123Z",
        "subject": "i-0abc",
        "datacontenttype": "application/json",
        "data": {"instance": "i-0abc", "state": "running"},
    }
    event.update(overrides)
    return {k: v for k, v in event.items() if v is not ...}


def body(document: Any) -> bytes:
    return json.dumps(document).encode()


# -- structured ----------------------------------------------------------------


def test_structured_event_decodes_every_attribute() -> None:
    event = decode_structured(body(structured(region="us-east-1", attempt=2, replay=False)))

    assert event == CloudEvent(
        id="evt-1",
        source="/aws/ec2/us-east-1",
        type="com.amazon.ec2.instance.state",
        specversion="1.0",
        subject="i-0abc",
        time=datetime(2024, 5, 1, 10, 20, 30, 123000, tzinfo=UTC),
        datacontenttype="application/json",
        data={"instance": "i-0abc", "state": "running"},
        extensions={"region": "us-east-1", "attempt": 2, "replay": False},
        mode=EventMode.STRUCTURED,
    )
    assert event.timestamp == pytest.approx(1714558830.123)


def test_to_dict_has_the_structured_json_shape() -> None:
    event = decode_structured(body(structured(region="eu", subject=..., datacontenttype=...)))

    assert event.to_dict() == {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/aws/ec2/us-east-1",
        "type": "com.amazon.ec2.instance.state",
        "subject": None,
        "time": "2024-05-01T10:20:30.123000+00:00",
        "datacontenttype": None,
        "dataschema": None,
        "data": {"instance": "i-0abc", "state": "running"},
        "region": "eu",
    }


def test_data_base64_becomes_bytes() -> None:
    raw = b"\x00\x01binary"
    event = decode_structured(
        body(structured(data=..., data_base64=base64.b64encode(raw).decode()))
    )
    assert event.data == raw


def test_null_attributes_count_as_absent() -> None:
    event = decode_structured(body(structured(subject=None, time=None, data=None)))
    assert event.subject is None and event.time is None and event.data is None


@pytest.mark.parametrize(
    ("time", "expected"),
    [
        ("2024-05-01T10:20:30Z", datetime(2024, 5, 1, 10, 20, 30, tzinfo=UTC)),
        ("2024-05-01t10:20:30z", datetime(2024, 5, 1, 10, 20, 30, tzinfo=UTC)),
        (
            "2024-05-01T10:20:30.123456789+02:00",
            datetime(2024, 5, 1, 10, 20, 30, 123456, tzinfo=timezone(timedelta(hours=2))),
        ),
    ],
)
def test_rfc3339_times(time: str, expected: datetime) -> None:
    assert decode_structured(body(structured(time=time))).time == expected


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (structured(source=...), "missing required attribute 'source'"),
        (structured(id=...), "missing required attribute 'id'"),
        (structured(type=None), "missing required attribute 'type'"),
        (structured(specversion=...), "missing required attribute 'specversion'"),
        (structured(specversion="0.3"), "unsupported specversion 0.3"),
        (structured(id=7), "attribute 'id' must be a string, not number"),
        (structured(source=""), "attribute 'source' must not be empty"),
        (
            structured(time="yesterday"),
            "attribute 'time' is not an RFC 3339 timestamp: 'yesterday'",
        ),
        (
            structured(time="2024-05-01T10:20:30"),
            "attribute 'time' is not an RFC 3339 timestamp: '2024-05-01T10:20:30'",
        ),
        (
            structured(time="2024-13-01T10:20:30Z"),
            "attribute 'time' is invalid: month must be in 1..12",
        ),
        (structured(Region="x"), "invalid attribute name 'Region'"),
        (
            structured(tags={"a": 1}),
            "extension 'tags' must be a string, integer or boolean, not object",
        ),
        (structured(data_base64="AAAA"), "both 'data' and 'data_base64' are present"),
        (structured(data=..., data_base64="!!"), "invalid base64 in 'data_base64'"),
        ([1, 2], "event must be a JSON object, not array"),
    ],
)
def test_structured_errors_are_precise(document: Any, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_structured(body(document))
    assert caught.value.reason.startswith(reason)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "invalid JSON: Expecting property name enclosed in double quotes"),
        (b"\xff\xfe\x00garbage", "invalid JSON: "),
        (b"", "invalid JSON: Expecting value"),
    ],
)
def test_invalid_json(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=r"^invalid JSON") as caught:
        decode_structured(raw)
    assert caught.value.reason.startswith(reason)


# -- binary --------------------------------------------------------------------

KAFKA_HEADERS = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"evt-2"),
    ("ce_source", b"/awesome/eu-1"),
    ("ce_type", b"vm.created"),
    ("ce_time", b"2024-05-01T10:20:30Z"),
    ("ce_tenant", b"acme"),
    ("content-type", b"application/json"),
    ("traceparent", b"00-abc-def-01"),
]


def test_binary_kafka_headers_and_json_body() -> None:
    event = decode_binary(KAFKA_HEADERS, b'{"vm": "vm-1"}', "ce_")

    assert event.mode is EventMode.BINARY
    assert (event.id, event.source, event.type) == ("evt-2", "/awesome/eu-1", "vm.created")
    assert event.datacontenttype == "application/json"
    assert event.extensions == {"tenant": "acme"}
    assert event.data == {"vm": "vm-1"}
    assert event.time == datetime(2024, 5, 1, 10, 20, 30, tzinfo=UTC)


def test_binary_http_headers_are_case_insensitive_and_percent_decoded() -> None:
    headers = {
        "Ce-Specversion": "1.0",
        "Ce-Id": "evt-3",
        "Ce-Source": "/awesome/eu-1",
        "Ce-Type": "vm.deleted",
        "Ce-Subject": "vm%201",
        "Content-Type": "text/plain; charset=utf-8",
    }
    event = decode_binary(headers, b"gone", "ce-", percent_decode=True)

    assert event.subject == "vm 1"
    assert event.data == "gone"


def test_binary_body_kinds() -> None:
    base = [h for h in KAFKA_HEADERS if h[0] != "content-type"]
    assert decode_binary(base, b'{"a": 1}').data == {"a": 1}  # no content type: JSON if it parses
    assert decode_binary(base, b"\x00raw").data == b"\x00raw"
    assert decode_binary(base, None).data is None
    octets = [*base, ("content-type", b"application/octet-stream")]
    assert decode_binary(octets, b"{}").data == b"{}"


@pytest.mark.parametrize(
    ("drop", "extra", "reason"),
    [
        ("ce_source", [], "missing required attribute 'source'"),
        ("ce_specversion", [("ce_specversion", b"0.3")], "unsupported specversion 0.3"),
        ("", [("ce_datacontenttype", b"x")], "use content-type, not a ce_datacontenttype header"),
        ("ce_id", [("ce_id", b"\xff")], "header 'ce_id' is not UTF-8"),
    ],
)
def test_binary_errors(drop: str, extra: list[tuple[str, bytes]], reason: str) -> None:
    headers = [h for h in KAFKA_HEADERS if h[0] != drop] + extra
    with pytest.raises(DecodeError, match=reason):
        decode_binary(headers, b"{}")


def test_binary_json_body_must_be_valid() -> None:
    with pytest.raises(DecodeError, match=r"^invalid JSON"):
        decode_binary(KAFKA_HEADERS, b"{oops")


# -- batch and plain -----------------------------------------------------------


def test_batch_decodes_each_event() -> None:
    events = decode_batch(body([structured(id="a"), structured(id="b")]))
    assert [e.id for e in events] == ["a", "b"]
    assert decode_batch(b"[]") == []


def test_batch_errors_name_the_item() -> None:
    with pytest.raises(DecodeError, match=r"^batch must be a JSON array, not object$"):
        decode_batch(body(structured()))
    with pytest.raises(DecodeError, match=r"^batch item 1: missing required attribute 'type'$"):
        decode_batch(body([structured(), structured(type=...)]))


def test_plain_json_is_wrapped() -> None:
    event = decode_plain(b'{"detail-type": "EC2 State"}', id="t/0/5", source="kafka:t")

    assert event.is_plain and event.mode is EventMode.PLAIN
    assert (event.id, event.source, event.type, event.specversion) == ("t/0/5", "kafka:t", "", None)
    assert event.data == {"detail-type": "EC2 State"}
    with pytest.raises(DecodeError, match=r"^empty body$"):
        decode_plain(b"")


# -- picking the mode of a Kafka record ----------------------------------------


def test_kafka_record_modes() -> None:
    ce_json = [("content-type", b"application/cloudevents+json; charset=utf-8")]
    batch = [("content-type", b"application/cloudevents-batch+json")]

    [one] = decode_kafka_record(ce_json, body(structured()))
    assert one.mode is EventMode.STRUCTURED and one.id == "evt-1"
    assert [e.id for e in decode_kafka_record(batch, body([structured(id="x")]))] == ["x"]
    [binary] = decode_kafka_record(KAFKA_HEADERS, b'{"vm": 1}')
    assert binary.mode is EventMode.BINARY
    # No content type, but a CloudEvents document: structured all the same.
    [sniffed] = decode_kafka_record([], body(structured(id="y")))
    assert sniffed.mode is EventMode.STRUCTURED and sniffed.id == "y"
    [plain] = decode_kafka_record([], b'{"vm": "vm-9"}', plain_id="t/1/2", plain_source="kafka:t")
    assert plain.is_plain and plain.data == {"vm": "vm-9"} and plain.id == "t/1/2"


@pytest.mark.parametrize(
    ("headers", "value", "reason"),
    [
        ([("content-type", b"application/cloudevents+avro")], b"x", "unsupported event format"),
        ([], None, "empty record value"),
        ([("content-type", b"application/cloudevents+json")], b"", "empty record value"),
        ([], b"\x00\x01", "invalid JSON"),
        ([], body({"specversion": "0.3", "id": "1"}), "missing required attribute 'source'"),
    ],
)
def test_kafka_record_errors(
    headers: list[tuple[str, bytes]], value: bytes | None, reason: str
) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_kafka_record(headers, value)


def test_kafka_binary_record_reads_headers_case_insensitively_every_time() -> None:
    mixed = [
        (name.upper() if i % 2 else name, value) for i, (name, value) in enumerate(KAFKA_HEADERS)
    ]
    for _ in range(2):  # the second time the header names are known
        [event] = decode_kafka_record(mixed, b'{"vm": "vm-1"}')
        assert event == decode_binary(KAFKA_HEADERS, b'{"vm": "vm-1"}')
        assert event.extensions == {"tenant": "acme"}


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ([("ce_data", b"x")], "header 'ce_data' is not a context attribute"),
        ([("CE_Data_Base64", b"x")], "header 'CE_Data_Base64' is not a context attribute"),
        ([("ce_subject", b"\xff")], "header 'ce_subject' is not UTF-8"),
        ([("ce_Bad-Name", b"x")], "invalid attribute name 'bad-name'"),
    ],
)
def test_kafka_binary_record_errors_are_those_of_decode_binary(
    extra: list[tuple[str, bytes]], reason: str
) -> None:
    headers = KAFKA_HEADERS + extra
    with pytest.raises(DecodeError, match=reason):
        decode_binary(headers, b"{}")
    with pytest.raises(DecodeError, match=reason):
        decode_kafka_record(headers, b"{}")


def test_ce_headers_of_a_structured_record_are_ignored() -> None:
    headers = [("content-type", b"application/cloudevents+json"), ("ce_data", b"\xff")]
    [event] = decode_kafka_record(headers, body(structured()))
    assert event.mode is EventMode.STRUCTURED and event.id == "evt-1"


def test_a_bad_time_is_reported_each_time_with_its_place() -> None:
    document = [structured(), structured(time="2024-05-01T10:20:30")]
    for _ in range(2):
        with pytest.raises(DecodeError) as caught:
            decode_batch(body(document))
        assert caught.value.reason == (
            "batch item 1: attribute 'time' is not an RFC 3339 timestamp: '2024-05-01T10:20:30'"
        )


def test_to_dict_keeps_extensions_first_and_attributes_win() -> None:
    event = CloudEvent(id="a", source="s", type="t", extensions={"zone": "eu", "id": "shadow"})
    assert list(event.to_dict()) == [
        "zone",
        "id",
        "specversion",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "dataschema",
        "data",
    ]
    assert event.to_dict()["id"] == "a"


def test_json_bodies_in_other_encodings_still_decode() -> None:
    document = {"vm": "vm-\u00e9"}
    for encoding in ("utf-8", "utf-16-le", "utf-16", "utf-32"):
        raw = json.dumps(document, ensure_ascii=False).encode(encoding)
        assert decode_binary(KAFKA_HEADERS, raw).data == document
