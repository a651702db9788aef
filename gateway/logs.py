"""logs.py: structured logging for the gateway: JSON lines, request ids, a sampled access log.

In: log records from every module (``logging.getLogger(__name__)``, fields in ``extra``),
and from the libraries underneath (uvicorn, grpc, asyncio, Python warnings), request headers
(HTTP, ASGI raw headers or gRPC metadata) and body ids. Out: one JSON object per line on
stderr, or plain text with control characters escaped (``configure_logging``); a safe request
id per request (``request_id`` for headers, ``sanitize_request_id`` for any other source);
access-log lines for a sample of successes and every error (``AccessLog``). It imports
nothing from the gateway and knows no protocol library: headers arrive as a mapping or as
name/value pairs, and uvicorn gets a logging config (``uvicorn_log_config``) to pass along.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import msgspec

__all__ = [
    "RequestIds",
    "JsonFormatter",
    "configure_logging",
    "uvicorn_log_config",
    "LIBRARY_LOGGERS",
    "request_id",
    "sanitize_request_id",
    "parse_traceparent",
    "AccessLog",
    "ACCESS_LOGGER",
    "MAX_REQUEST_ID_CHARS",
]

ACCESS_LOGGER: Final = "gateway.access"
MAX_REQUEST_ID_CHARS: Final = 128  # longer ids are someone's payload, not an id
_TRACEPARENT_CHARS: Final = 55  # "00-" + 32 + "-" + 16 + "-" + 2
_HEX: Final = frozenset("0123456789abcdef")
_PLAIN_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RESERVED: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _fallback(value: object) -> object:
    """Values msgspec cannot encode (paths, enums of other libraries, ...) as text."""
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601 UTC, milliseconds), ``level``,
    ``logger``, ``message``, then every ``extra`` field, then ``exc`` (the traceback text)
    and ``stack`` when present. Extra fields never replace the first four."""

    def __init__(self) -> None:
        super().__init__()
        self._encode = msgspec.json.Encoder(enc_hook=_fallback).encode

    @staticmethod
    def timestamp(created: float) -> str:
        seconds = int(created)
        millis = int((created - seconds) * 1000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": self.timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key not in line:
                line[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        try:
            return self._encode(line).decode("utf-8")
        except (TypeError, ValueError, OverflowError) as exc:  # a log line must never fail
            line = {k: v for k, v in line.items() if k in ("ts", "level", "logger", "message")}
            line["log_error"] = f"extra fields not encodable: {exc}"
            return self._encode(line).decode("utf-8")


# Control characters (C0, DEL, C1) in a text log line would forge lines or drive the
# terminal: escaped as \\n, \\x1b and so on.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")


def _escape_control(text: str) -> str:
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class PlainFormatter(logging.Formatter):
    """Text lines, ``%(asctime)s %(levelname)s %(name)s: %(message)s``, in which a
    client's bytes can never start a line or reach the terminal: control characters in
    the message are escaped, and every line of a traceback or stack is indented (and
    escaped), so only a record's first line starts at column 0."""

    def __init__(self) -> None:
        super().__init__(_PLAIN_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = _escape_control(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        # Indented here, not in formatException: another handler may have cached exc_text.
        if record.exc_text:
            line += "\n" + _indent(record.exc_text)
        if record.stack_info:
            line += "\n" + _indent(self.formatStack(record.stack_info))
        return line


def _indent(text: str) -> str:
    return "\n".join("  " + _escape_control(line) for line in text.split("\n"))


# The loggers of the libraries we run on; configure_logging sends them through our handler.
# grpc's C core writes to stderr itself (GRPC_VERBOSITY), outside Python's logging.
LIBRARY_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access", "grpc", "asyncio")


def uvicorn_log_config() -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``uvicorn.Config(log_config=...)``: uvicorn's
    loggers get no handlers of their own and propagate to the root, where
    ``configure_logging`` put ours. (uvicorn's default config installs text handlers on
    them each time a ``Config`` is built, which would bypass the JSON formatter.)"""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


class _GatewayHandler(logging.StreamHandler):  # type: ignore[type-arg]  # stream type varies
    """Marks the handler ``configure_logging`` installed, so a second call replaces it."""


def configure_logging(level: str, json_lines: bool) -> None:
    """Send the root logger's records at ``level`` and above to stderr, as JSON lines or
    as plain text (``PlainFormatter``: control characters escaped). The libraries'
    loggers (``LIBRARY_LOGGERS``) lose any handler of their own and propagate to it, and
    Python warnings become log records (``logging.captureWarnings``), so every line has
    the one format. Idempotent: a second call replaces the handler the first one added and
    leaves every other root handler alone. Raises ``ValueError`` for an unknown level."""
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r} (use DEBUG, INFO, WARNING or ERROR)")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _GatewayHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _GatewayHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    root.addHandler(handler)
    root.setLevel(number)
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for own in list(library.handlers):
            library.removeHandler(own)
        library.propagate = True
    logging.captureWarnings(True)


# -- request ids ----------------------------------------------------------------------------


def _is_sane_id(value: str) -> bool:
    # Visible ASCII only: an id goes into log lines and response headers unescaped.
    return (
        0 < len(value) <= MAX_REQUEST_ID_CHARS
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


_NOT_VISIBLE: Final = re.compile("[^!-~]")  # anything but visible ASCII (0x21-0x7e)


def sanitize_request_id(value: str | bytes | None) -> str:
    """A client's request id made safe for a response header and a log line: surrounding
    whitespace removed, then every character that is not visible ASCII (controls, spaces,
    DEL, non-ASCII) replaced by ``_``, then cut to ``MAX_REQUEST_ID_CHARS`` (128, so 128
    bytes). "" when nothing is left (the caller then makes a new id). The one sanitiser
    for every source: ``x-request-id`` headers, gRPC metadata and the V2 body ``id``.
    A hostile id of 100 KB costs one bounded scan: only its first 4 KiB are looked at."""
    if value is None:
        return ""
    text = value[:4096].decode("latin-1") if isinstance(value, bytes) else value[:4096]
    value = text.strip()
    if _is_sane_id(value):
        return value
    return _NOT_VISIBLE.sub("_", value[:MAX_REQUEST_ID_CHARS])


def parse_traceparent(value: str) -> str | None:
    """The trace id of a W3C ``traceparent`` (version 00: ``00-<32 hex>-<16 hex>-<2 hex>``,
    lower-case, neither id all zeros), or None when the header is not valid."""
    if len(value) != _TRACEPARENT_CHARS or not value.startswith("00-"):
        return None
    if value[35] != "-" or value[52] != "-":
        return None
    trace_id, parent_id, flags = value[3:35], value[36:52], value[53:]
    if not _HEX.issuperset(trace_id + parent_id + flags):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def request_id(
    headers: Mapping[str, str] | Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]],
) -> str:
    """The request's id: ``x-request-id`` when present and not blank, made safe by
    ``sanitize_request_id``; else the trace id of a valid W3C ``traceparent``; else a new
    random 32-hex-digit id. Mapping keys are expected lower-case (ASGI, HTTP/2 and gRPC metadata
    deliver them so; Starlette's ``Headers`` is case-insensitive anyway); name/value pairs
    (ASGI raw headers, gRPC metadata, bytes or str) are matched case-insensitively."""
    given: str | None = None
    traceparent: str | None = None
    if isinstance(headers, Mapping):
        given = headers.get("x-request-id")
        traceparent = headers.get("traceparent")
    else:
        for raw_name, raw_value in headers:
            name = _text(raw_name).lower()
            if name == "x-request-id" and given is None:
                given = _text(raw_value)
            elif name == "traceparent" and traceparent is None:
                traceparent = _text(raw_value)
    if given is not None:
        given = sanitize_request_id(given)
        if given:
            return given
    if traceparent is not None:
        trace_id = parse_traceparent(traceparent.strip())
        if trace_id is not None:
            return trace_id
    return secrets.token_hex(16)


# -- access log -----------------------------------------------------------------------------


class AccessLog:
    """A sampled access log: every error, ``sample_rate`` of successes (0..1).

    Call ``should_log`` first, so an unsampled request costs one random draw and builds
    nothing; then ``log``. Lines go to the ``gateway.access`` logger at INFO with the fields
    in ``extra``, so with ``configure_logging(..., json_lines=True)`` each is one JSON line.
    ``rng`` is a seam for tests (a fixed sequence)."""

    def __init__(
        self,
        sample_rate: float,
        *,
        rng: Callable[[], float] = random.random,
        logger: logging.Logger | None = None,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError("access log sample_rate must be within 0..1")
        self.sample_rate = sample_rate
        self._rng = rng
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)

    def should_log(self, is_error: bool) -> bool:
        if is_error:
            return True
        rate = self.sample_rate
        return rate >= 1.0 or (rate > 0.0 and self._rng() < rate)

    def log(
        self,
        request_id: str,
        protocol: str,
        model: str,
        version: str,
        status: int | str,
        latency_ms: float,
    ) -> None:
        """Write one access line (never raises: logging handles its own errors)."""
        self._logger.info(
            "%s %s %s/%s %s %.3f ms",
            request_id,
            protocol,
            model,
            version,
            status,
            latency_ms,
            extra={
                "request_id": request_id,
                "protocol": protocol,
                "model": model,
                "version": version,
                "status": status,
                "latency_ms": round(latency_ms, 3),
            },
        )


class RequestIds:
    """Unguessable ids for requests that bring none: 128 random bits each (32 hex digits),
    cut from a buffer the OS CSPRNG fills 256 ids at a time. About 0.2 µs per id against
    0.7 µs for ``secrets.token_hex(16)`` per call (``python -m bench.tls`` measures both).
    An id cannot be derived from another, so a caller who sees its own ids cannot name
    another caller's prediction (feedback joins by id)."""

    __slots__ = ("_hex", "_pos")

    _BATCH = 256

    def __init__(self) -> None:
        self._hex = ""
        self._pos = 0

    def new(self) -> str:
        pos = self._pos
        if pos >= len(self._hex):
            self._hex = os.urandom(16 * self._BATCH).hex()
            pos = 0
        self._pos = pos + 32
        return self._hex[pos : pos + 32]
