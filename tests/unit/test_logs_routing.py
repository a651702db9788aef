"""Every line on stderr has our format: uvicorn's, grpc's and asyncio's loggers and Python
warnings go through configure_logging's handler, and text lines escape control characters.

The uvicorn case runs a real uvicorn server on 127.0.0.1 and sends it a request its parser
refuses ("Invalid HTTP request received."), which uvicorn logs with a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from gateway.logs import LIBRARY_LOGGERS, configure_logging, uvicorn_log_config


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Put the root logger, the library loggers and warning capture back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {
        name: (list(lg.handlers), lg.propagate, lg.level)
        for name in LIBRARY_LOGGERS
        for lg in [logging.getLogger(name)]
    }
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, (own, propagate, lib_level) in libraries.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = own
        lg.propagate = propagate
        lg.setLevel(lib_level)
    logging.captureWarnings(False)


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _send_invalid_request() -> bytes:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _app,
        lifespan="off",
        http="httptools",
        log_level="info",
        access_log=True,
        log_config=uvicorn_log_config(),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110  # uvicorn offers a flag, no event
                await asyncio.sleep(0.005)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX\x00Bad: \x1b[31m\r\n\r\n")
            answer = await reader.read()  # uvicorn logs, answers 400, closes
            writer.close()
            # One valid request too, for an access-log line.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await reader.read()
            writer.close()
    finally:
        server.should_exit = True
        await task
    return answer


def _json_lines(err: str) -> list[dict[str, Any]]:
    lines = [line for line in err.splitlines() if line]
    return [json.loads(line) for line in lines]  # fails on any line that is not JSON


def test_uvicorn_lines_are_json(restored_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_lines=True)
    answer = asyncio.run(_send_invalid_request())
    assert answer.startswith(b"HTTP/1.1 400")
    records = _json_lines(capsys.readouterr().err)
    invalid = [r for r in records if "Invalid HTTP request" in str(r["message"])]
    assert invalid
    assert invalid[0]["logger"] == "uvicorn.error"
    assert any(r["logger"] == "uvicorn.access" and "/ok" in str(r["message"]) for r in records)


def test_warnings_asyncio_and_grpc_lines_are_json(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logging.getLogger("grpc").addHandler(logging.StreamHandler())  # a stray text handler
    configure_logging("INFO", json_lines=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("overflow encountered in cast", RuntimeWarning, stacklevel=1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_exception_handler({"message": "Task exception was never retrieved"})

    asyncio.run(main())
    logging.getLogger("grpc._server").error("Exception calling application: %s", "boom")
    records = _json_lines(capsys.readouterr().err)
    by_logger = {str(r["logger"]): str(r["message"]) for r in records}
    assert "overflow encountered in cast" in by_logger["py.warnings"]
    assert "never retrieved" in by_logger["asyncio"]
    assert by_logger["grpc._server"] == "Exception calling application: boom"


def test_text_lines_escape_control_characters(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", json_lines=False)
    log = logging.getLogger("gateway.test")
    log.warning("id %s", "abc\r\n2026-01-01 00:00:00 ERROR forged\x1b[2J\x00")
    try:
        raise ValueError("bad\nINFO forged too")
    except ValueError:
        log.exception("failed")
    err = capsys.readouterr().err
    lines = err.splitlines()
    for control in "\x1b\x00\r":
        assert control not in err
    assert lines[0].endswith("id abc\\r\\n2026-01-01 00:00:00 ERROR forged\\x1b[2J\\x00")
    # Every line of the record is either a record's first line or indented.
    starts = [line for line in lines if not line.startswith("  ")]
    assert len(starts) == 2
    assert "  INFO forged too" in lines
