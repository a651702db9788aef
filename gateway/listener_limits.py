"""listener_limits.py: the connection-level limits of both listeners, from ``[limits]``.

In: ``LimitsSettings``. Out: for uvicorn, an httptools protocol class that bounds each
request's header bytes and count (431), the time to read the headers (slowloris: 408 or
close), and the open connections (503 and close at once), plus the ``uvicorn.Config``
keyword arguments (keep-alive timeout, ``limit_concurrency``); for grpc.aio, the server
options (message size, concurrent streams, keep-alive enforcement, connection idle and age,
handshake timeout). uvicorn and grpcio options are used where they exist; the protocol
subclass covers what uvicorn's httptools protocol has no option for. It knows nothing of
routes, models or the apps served.

The same protocol hands each request a ``ResponseWriter`` (``scope["extensions"]
[RESPONSE_WRITER]``): an app that sends a response's head and body back to back can have
them leave in one system call, so the client wakes once per response instead of twice.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any, Final

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import LimitsSettings

__all__ = [
    "RESPONSE_WRITER",
    "LimitedHttpToolsProtocol",
    "ResponseWriter",
    "http_protocol_class",
    "uvicorn_limits",
    "grpc_options",
    "connection_limit",
]

logger = logging.getLogger(__name__)

_REASONS: Final = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def connection_limit(limits: LimitsSettings) -> int:
    """Open connections one HTTP listener may hold (0: no limit). -1 in the settings means a
    quarter of the soft RLIMIT_NOFILE, so the three listeners together leave a quarter of
    the descriptors to gRPC, files and the model runtime whatever the HTTP clients do."""
    if limits.max_connections >= 0:
        return limits.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 0
    return max(16, soft // 4)


def _refusal(status: int, message: str) -> bytes:
    body = message.encode("ascii", "replace")
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        )
    )


RESPONSE_WRITER: Final = "gateway.response_writer"
"""The scope extension under which a request finds its connection's ``ResponseWriter``."""


class ResponseWriter:
    """A connection's transport as its request cycles see it. ``hold_next()`` keeps the next
    write (a response's head) and sends it with the write after it (the body) in one
    ``writelines``: one system call and one wake-up of the client. ``flush()`` sends what
    is held; closing flushes first. Everything else passes through to the transport."""

    __slots__ = ("_held", "_holding", "_transport", "get_extra_info", "is_closing")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._holding = False
        # Called on every response by uvicorn: bound here, not found through __getattr__.
        self.is_closing = transport.is_closing
        self.get_extra_info = transport.get_extra_info

    def hold_next(self) -> None:
        self._holding = True

    def write(self, data: bytes) -> None:
        if self._holding:
            self._holding = False
            self._held = data
            return
        held = self._held
        if held is None:
            self._transport.write(data)
        else:
            self._held = None
            self._transport.writelines((held, data))

    def flush(self) -> None:
        self._holding = False
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# On shutdown an idle kept-alive connection stays open this long before it is closed: a
# request its client sent just before (still in the kernel's buffers) is then answered,
# with ``connection: close``, instead of meeting a closed socket.
_DRAIN_LINGER_S: Final = 0.5


class _HeadersRefusedError(Exception):
    """Raised from a parser callback to stop parsing a request whose headers are refused."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header, header-time and connection limits.

    The class attributes are set by ``http_protocol_class``. Header bytes are counted per
    read while a request's headers are incomplete, so an 8 MiB header costs at most one
    read (a few hundred KiB) past the limit before it is refused.
    """

    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    max_connections: int = 0
    drain_linger_s: float = _DRAIN_LINGER_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._draining = False
        self._in_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_deadline: float | None = None
        self._refused = False
        self._extensions: dict[str, Any] = {}
        """Put in every request's ``scope["extensions"]`` (the response writer, and what
        subclasses add per connection)."""

    # -- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        writer = ResponseWriter(transport)
        self.transport = writer  # type: ignore[assignment]  # a transport to every cycle
        self._extensions[RESPONSE_WRITER] = writer
        if self.max_connections and len(self.connections) > self.max_connections:
            self._refuse(503, "too many open connections; retry later")
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self._header_deadline is None:
            self._arm_header_timer()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self._refused:
                self.logger.debug("invalid HTTP request received")
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._in_headers:
            # Still inside a request's headers after this read: all of it counts (a read
            # that completes the headers is not counted, so a body never does).
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse(431, f"request headers exceed {self.max_header_bytes} bytes")

    # -- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions = self.scope.get("extensions")
        if extensions is None:
            self.scope["extensions"] = self._extensions
        else:
            extensions.update(self._extensions)
        self._in_headers = True
        self._header_bytes = 0
        self._header_count = 0
        if self._header_deadline is None:
            self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self.max_header_bytes:
            self._refuse(431, f"request line exceeds {self.max_header_bytes} bytes")
            raise _HeadersRefusedError
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            self._refuse(431, f"more than {self.max_headers} header fields")
            raise _HeadersRefusedError
        if len(name) + len(value) > self.max_header_bytes:
            self._refuse(431, f"request headers exceed {self.max_header_bytes} bytes")
            raise _HeadersRefusedError
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._disarm_header_timer()
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with connection: close, then closed

    # -- graceful shutdown ----------------------------------------------------------------

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown, per connection: a request being served finishes
        and its connection closes after it; an idle connection lingers briefly, so a
        request already on its way is answered rather than cut off."""
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return
        self._unset_keepalive_if_required()
        self.loop.call_later(self.drain_linger_s, self._close_if_idle)

    def _close_if_idle(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request arrived meanwhile: closed once answered
        if self._in_headers and self._header_bytes:
            return  # a request is arriving: the header timer bounds it
        transport.close()

    # -- refusals and timers --------------------------------------------------------------

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with ``message`` and close: no more of this connection's bytes
        are parsed."""
        if self._refused:
            return
        self._refused = True
        self._cancel_header_timer()
        self._unset_keepalive_if_required()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if status == 400:
                self.send_400_response(message)
                return
            transport.write(_refusal(status, message))
            transport.close()

    # The header deadline is a value, the timer only its lazy guard: a request's headers
    # set and clear the deadline (no timer handle made and cancelled per request); the one
    # timer of a connection wakes at the deadline it was armed for and re-arms for a later
    # one, so a busy keep-alive connection wakes about once per header timeout.

    def _arm_header_timer(self) -> None:
        """The headers (or the first bytes of an idle connection) are due within
        ``header_timeout_s`` from now."""
        if self.header_timeout_s <= 0:
            return
        deadline = self._header_deadline = self.loop.time() + self.header_timeout_s
        if self._header_timer is None:
            self._header_timer = self.loop.call_at(deadline, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        self._header_deadline = None

    def _cancel_header_timer(self) -> None:
        self._header_deadline = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        deadline = self._header_deadline
        if deadline is None:
            return  # the headers came in time; the next request arms again
        if self.loop.time() < deadline:  # re-armed since: wait for the later deadline
            self._header_timer = self.loop.call_at(deadline, self._header_timeout)
            return
        self._header_deadline = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served: the header phase is over
        if self._header_bytes or not self._in_headers:
            self._refuse(408, f"request headers not received within {self.header_timeout_s:g} s")
        else:
            self._refused = True
            transport.close()  # a connection that never said anything gets no answer


def http_protocol_class(limits: LimitsSettings) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with ``limits`` applied."""
    return type(
        "GatewayHttpProtocol",
        (LimitedHttpToolsProtocol,),
        {
            "max_header_bytes": limits.max_header_bytes,
            "max_headers": limits.max_headers,
            "header_timeout_s": limits.seconds("header_timeout"),
            "max_connections": connection_limit(limits),
        },
    )


def uvicorn_limits(limits: LimitsSettings) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for ``limits``: the protocol class, the
    keep-alive timeout and ``limit_concurrency``."""
    keep_alive = limits.seconds("keep_alive_timeout")
    return {
        "http": http_protocol_class(limits),
        "timeout_keep_alive": max(keep_alive, 0.001),
        "limit_concurrency": limits.max_concurrency or None,
        "h11_max_incomplete_event_size": limits.max_header_bytes,
    }


def _ms(limits: LimitsSettings, name: str) -> int:
    return int(limits.seconds(name) * 1000)


def grpc_options(
    limits: LimitsSettings, max_message_bytes: int, *, reuse_port: bool = False
) -> list[tuple[str, Any]]:
    """grpc.aio server options for ``limits``: message size, concurrent streams per
    connection, keep-alive pings and their enforcement, connection idle and age, and the
    handshake timeout (a connection that never speaks HTTP/2 is closed after
    ``header_timeout``) and the metadata size (``max_header_bytes``)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),  # 1 only for --workers
        ("grpc.keepalive_time_ms", _ms(limits, "grpc_keepalive_time")),
        ("grpc.keepalive_timeout_ms", _ms(limits, "grpc_keepalive_timeout")),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(limits, "grpc_min_ping_interval")),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_metadata_size", limits.max_header_bytes),
    ]
    if limits.grpc_max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", limits.grpc_max_concurrent_streams))
    if _ms(limits, "header_timeout"):
        options.append(("grpc.server_handshake_timeout_ms", _ms(limits, "header_timeout")))
    if _ms(limits, "grpc_max_connection_idle"):
        options.append(("grpc.max_connection_idle_ms", _ms(limits, "grpc_max_connection_idle")))
    if _ms(limits, "grpc_max_connection_age"):
        options.append(("grpc.max_connection_age_ms", _ms(limits, "grpc_max_connection_age")))
        options.append(
            ("grpc.max_connection_age_grace_ms", _ms(limits, "grpc_max_connection_age_grace"))
        )
    return options
