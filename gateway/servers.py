"""servers.py: the listeners: uvicorn for the ASGI apps (V2 REST, admin) and grpc.aio for the
V2 gRPC, health and feedback services.

In: an ASGI app or the servicers, a host and port (0 binds a free one), the grace period.
Out: a started listener that knows its bound port and stops gracefully. Neither server
installs signal handlers: ``app.py`` owns the process signals. TLS and SO_REUSEPORT workers
land here. It knows nothing of what the apps and servicers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Generator, Sequence
from typing import Any

# grpc's C core logs to stderr itself, as text; errors only (a setting from the
# environment wins). Read when the first server or channel starts.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import uvicorn

from gateway._proto import feedback_pb2_grpc, health_pb2_grpc
from gateway._proto import grpc_service_pb2_grpc as pb_grpc
from gateway.config import LimitsSettings
from gateway.listener_limits import LimitedHttpToolsProtocol, grpc_options, uvicorn_limits
from gateway.logs import uvicorn_log_config
from gateway.tls import peer_identities

__all__ = ["HttpListener", "GrpcListener", "bind"]

_BACKLOG = 2048  # pending connections per listener: a burst of clients connecting at once


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: ``app.py`` owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (IPv6 when the host has a colon).
    ``reuse_port``: SO_REUSEPORT, so worker processes share the port (the kernel spreads
    connections among them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says TCP; without it a response written in two parts (headers,
    # body) waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(_BACKLOG)
    sock.setblocking(False)
    return sock


class HttpListener:
    """One ASGI app served by uvicorn on a socket we bind (port 0 works)."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        access_log: bool,
        grace_period_s: float,
        reuse_port: bool = False,
        limits: LimitsSettings | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._reuse_port = reuse_port
        self._app = app
        self._limits = limits or LimitsSettings()
        self._ssl = ssl_context
        self._host = host
        self._port = port
        self._access_log = access_log
        self._grace_period_s = grace_period_s
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        """The bound port, once started."""

    async def start(self) -> None:
        """Bind and serve; returns once uvicorn has started."""
        sock = bind(self._host, self._port, reuse_port=self._reuse_port)
        self.port = int(sock.getsockname()[1])
        kwargs: dict[str, Any] = {"http": "httptools", "timeout_keep_alive": 30}
        kwargs.update(uvicorn_limits(self._limits))  # header, idle and connection limits
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            interface="asgi3",
            access_log=self._access_log,
            proxy_headers=False,
            server_header=False,
            date_header=False,
            log_level="warning",
            timeout_graceful_shutdown=int(self._grace_period_s),
            log_config=uvicorn_log_config(),
            **kwargs,
        )
        if self._ssl is not None:
            # uvicorn builds a context from file names; ours is reloaded in place (tls.py).
            config.load()
            config.ssl = self._ssl
            if self._ssl.verify_mode == ssl.CERT_REQUIRED:
                config.http_protocol_class = _mutual_tls_protocol(kwargs["http"])
        server = self._server = _Uvicorn(config)
        task = self._task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(
                    f"HTTP listener {self._host}:{self._port} stopped during start-up"
                )
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting; in-flight requests finish within the grace period."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task


def _mutual_tls_protocol(base: type[LimitedHttpToolsProtocol]) -> type[LimitedHttpToolsProtocol]:
    """``base`` (the listener's limited protocol) that also puts the verified client
    certificate's identities (``tls.peer_identities``, read once per connection) in each
    request's scope as ``scope["extensions"]["tls"]["client_identities"]``."""

    class MutualTlsProtocol(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            ssl_object = transport.get_extra_info("ssl_object")
            cert = ssl_object.getpeercert() if ssl_object is not None else None
            self._extensions["tls"] = {"client_identities": peer_identities(cert)}
            super().connection_made(transport)

    return MutualTlsProtocol


class _GenericOnly:
    """The server as the generated ``add_*_to_server`` functions see it: a service's
    methods are served through its generic handler only, never also registered one by one.

    grpc.aio's accept loop keeps one pending request per registered method (plus one for
    generic calls) and runs ``asyncio.wait`` over all of them for every call it accepts:
    with the V2, health and feedback services' 15 methods that is 16 futures, each given
    and relieved of a done-callback per call, about 10 µs of the event loop's time per
    call more than one future costs (measured on uvloop: 19.2 µs against 9.2 µs per
    wait). A generic handler finds the method with one dict lookup instead.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Skipped: the same handlers were just added as the service's generic handler."""


class GrpcListener:
    """The grpc.aio server with the V2 inference, health and (optional) feedback services."""

    def __init__(
        self,
        inference: pb_grpc.GRPCInferenceServiceServicer,
        health: health_pb2_grpc.HealthServicer,
        feedback: feedback_pb2_grpc.FeedbackServicer | None,
        host: str,
        port: int,
        *,
        max_message_bytes: int,
        reuse_port: bool = False,
        limits: LimitsSettings | None = None,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self._reuse_port = reuse_port
        self._credentials = credentials
        self._interceptors = tuple(interceptors)
        self._servicers = (inference, health, feedback)
        self._address = f"{host}:{port}"
        self._max_message_bytes = max_message_bytes
        self._limits = limits or LimitsSettings()
        self._server: grpc.aio.Server | None = None
        self.port = 0
        """The bound port, once started."""

    async def start(self) -> None:
        """Build the server on the running loop, bind and start it."""
        inference, health, feedback = self._servicers
        server = self._server = grpc.aio.server(
            interceptors=self._interceptors or None,
            options=grpc_options(
                self._limits, self._max_message_bytes, reuse_port=self._reuse_port
            ),
        )
        services = _GenericOnly(server)
        # Generated registration functions carry no annotations.
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, services)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(health, services)  # type: ignore[no-untyped-call]
        if feedback is not None:
            feedback_pb2_grpc.add_FeedbackServicer_to_server(feedback, services)  # type: ignore[no-untyped-call]
        if self._credentials is not None:
            self.port = server.add_secure_port(self._address, self._credentials)
        else:
            self.port = server.add_insecure_port(self._address)
        await server.start()

    async def stop(self, grace_period_s: float) -> None:
        """Refuse new calls; calls in flight get ``grace_period_s`` to finish."""
        if self._server is not None:
            await self._server.stop(grace_period_s)
