"""Structured logging: the JSON formatter, configure_logging, request ids, access sampling."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from gateway.logs import (
    ACCESS_LOGGER,
    MAX_REQUEST_ID_CHARS,
    AccessLog,
    JsonFormatter,
    configure_logging,
    parse_traceparent,
    request_id,
    sanitize_request_id,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"  # the W3C specification's example


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.logs.captured")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, stream
    log.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_formatter_writes_one_json_object_per_line(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = captured
    log.info("loaded %s version %d", "m", 2, extra={"model": "m", "rows": 3, "level": "fake"})
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("failed", extra={"path": object()})
    first, second = lines(stream)
    assert list(first)[:4] == ["ts", "level", "logger", "message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(first["ts"]))
    assert first["level"] == "INFO"  # an extra field never replaces a core one
    assert first["logger"] == "tests.logs.captured"
    assert first["message"] == "loaded m version 2"
    assert first["model"] == "m"
    assert first["rows"] == 3
    assert second["level"] == "ERROR"
    assert "ValueError: bad\nvalue" in str(second["exc"])
    assert str(second["path"]).startswith("<object object")  # unencodable extras as text


def test_formatter_timestamp_is_utc() -> None:
    assert JsonFormatter.timestamp(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"


def test_configure_logging_is_idempotent() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        configure_logging("debug", json_lines=True)
        configure_logging("INFO", json_lines=False)
        added = [h for h in root.handlers if h not in before]
        assert len(added) == 1
        assert root.level == logging.INFO
        assert not isinstance(added[0].formatter, JsonFormatter)
        with pytest.raises(ValueError, match="unknown log level"):
            configure_logging("chatty", json_lines=True)
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)


def test_request_id_prefers_a_sane_x_request_id() -> None:
    assert request_id({"x-request-id": "abc-123", "traceparent": TRACEPARENT}) == "abc-123"
    raw = [(b"Traceparent", TRACEPARENT.encode()), (b"X-Request-ID", b"from-asgi")]
    assert request_id(raw) == "from-asgi"
    assert request_id([("x-request-id", "from-grpc")]) == "from-grpc"


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_blank_request_ids_fall_back_to_the_traceparent(blank: str) -> None:
    assert request_id({"x-request-id": blank, "traceparent": TRACEPARENT}) == TRACE_ID


@pytest.mark.parametrize(
    ("hostile", "safe"),
    [
        ("x" * 129, "x" * 128),
        ("has space", "has_space"),
        ("new\nline", "new_line"),
        ("caf\u00e9", "caf_"),
        ("a\r\nSet-Cookie: x=1", "a__Set-Cookie:_x=1"),
        ("\x00\x1b[31mred\x7f", "__[31mred_"),
        ("id-" + "A" * 100_000, "id-" + "A" * 125),
    ],
)
def test_hostile_request_ids_are_sanitised_from_every_source(hostile: str, safe: str) -> None:
    assert sanitize_request_id(hostile) == safe
    assert request_id({"x-request-id": hostile, "traceparent": TRACEPARENT}) == safe
    assert request_id([("x-request-id", hostile)]) == safe  # gRPC metadata
    assert len(sanitize_request_id(hostile).encode()) <= MAX_REQUEST_ID_CHARS


def test_sanitised_ids_are_visible_ascii_within_the_limit() -> None:
    for value in ["ok-123", "\x00" * 10, "é" * 500, b"\xff\xfe", None, ""]:
        out = sanitize_request_id(value)
        assert len(out) <= MAX_REQUEST_ID_CHARS
        assert all(0x21 <= ord(c) <= 0x7E for c in out)
    assert sanitize_request_id("ok-123") == "ok-123"
    assert sanitize_request_id(None) == ""
    assert sanitize_request_id(b"ab\r\ncd") == "ab__cd"  # raw header bytes
    assert request_id([(b"x-request-id", b"ab\r\ncd")]) == "ab__cd"


def test_traceparent_parsing() -> None:
    assert parse_traceparent(TRACEPARENT) == TRACE_ID
    invalid = [
        TRACEPARENT.upper(),  # the spec requires lower-case hex
        "01" + TRACEPARENT[2:],  # only version 00 has this exact layout
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID}-00f067aa0ba902b7-0",  # short
        f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra",
        f"00-{TRACE_ID[:-1]}g-00f067aa0ba902b7-01",
        f"00_{TRACE_ID}-00f067aa0ba902b7-01",
    ]
    for value in invalid:
        assert parse_traceparent(value) is None, value


def test_request_id_is_new_and_random_without_usable_headers() -> None:
    made = {request_id({"traceparent": "garbage"}) for _ in range(100)}
    assert len(made) == 100
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in made)
    assert re.fullmatch(r"[0-9a-f]{32}", request_id([]))


def test_access_log_keeps_every_error_and_samples_successes() -> None:
    draws = iter([0.05, 0.5, 0.09, 0.95])
    access = AccessLog(0.1, rng=lambda: next(draws))
    assert [access.should_log(False) for _ in range(4)] == [True, False, True, False]
    assert all(access.should_log(True) for _ in range(10))  # errors draw nothing
    assert not AccessLog(0.0).should_log(False)
    assert AccessLog(1.0).should_log(False)
    with pytest.raises(ValueError, match="sample_rate"):
        AccessLog(2.0)


def test_access_log_writes_one_json_line_with_the_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger(ACCESS_LOGGER + ".test")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        AccessLog(1.0, logger=log).log("rid-1", "http", "m", "2", 200, 1.23456)
    finally:
        log.removeHandler(handler)
    [line] = lines(stream)
    assert {k: line[k] for k in ("request_id", "protocol", "model", "version", "status")} == {
        "request_id": "rid-1",
        "protocol": "http",
        "model": "m",
        "version": "2",
        "status": 200,
    }
    assert line["latency_ms"] == 1.235
    assert line["message"] == "rid-1 http m/2 200 1.235 ms"
