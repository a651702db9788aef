"""http_api.py: the KServe V2 REST adapter (ASGI, served by uvicorn): decode -> dataplane ->
encode.

The infer route is a raw ASGI handler, the hot path: it reads the body, hands it to
``v2_json``, lets the data plane admit and answer it, and writes the answer. Every other V2
route (health, metadata, config, statistics, repository, feedback) is a Starlette route.
Errors are rendered by ``status.py``. Paths, headers and status codes live here; tensors,
dtypes, request ids and routing rules do not.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.codecs import v2_json
from gateway.codecs.feedback import decode_feedback_json
from gateway.codecs.limits import (
    DEFAULT_LIMITS,
    check_count,
    check_model_name,
    parse_timeout_ms,
)
from gateway.config import HttpSettings, LimitsSettings
from gateway.dataplane import DataPlane
from gateway.errors import (
    GatewayError,
    InternalError,
    InvalidInputError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from gateway.listener_limits import RESPONSE_WRITER, ResponseWriter
from gateway.logs import AccessLog
from gateway.metrics import CONTENT_TYPE
from gateway.status import error_response, http_status, render_error
from gateway.types import InferRequest, ModelControl

__all__ = ["HttpFrontEnd", "limit_body"]

logger = logging.getLogger(__name__)

_JSON: Final = b"application/json"
_OCTET: Final = b"application/octet-stream"
_HEADER_LENGTH: Final = b"inference-header-content-length"
_TIMEOUT_HEADER: Final = b"x-request-timeout-ms"
_ROUTING_KEY: Final = b"x-routing-key"
_VERSION_HEADER: Final = b"x-model-version"  # request: pin a version; response: served by
_INFER_HEADERS: Final = frozenset(
    {
        b"content-length",
        _HEADER_LENGTH,
        b"content-encoding",
        b"accept-encoding",
        _TIMEOUT_HEADER,
        _ROUTING_KEY,
        _VERSION_HEADER,
        b"x-request-id",
        b"traceparent",
    }
)
"""The request headers the infer route reads; any other is passed over with one lookup."""
_BODY_TIMEOUT_S: Final = 30.0  # a client that stops sending mid-body gets 408, not a hang
_ENCODINGS: Final = ("gzip", "deflate")


class _ClientGoneError(Exception):
    """The client disconnected before the request was read."""


def _json_response(payload: Any, status: int = 200) -> Response:
    return Response(v2_json.encode_json(payload), status, media_type="application/json")


def _response_writer(scope: Scope) -> ResponseWriter | None:
    """The listener's writer that sends a response's head with its body (absent when the
    app is served by another ASGI server)."""
    extensions = scope.get("extensions")
    writer: ResponseWriter | None = extensions.get(RESPONSE_WRITER) if extensions else None
    return writer


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding == "gzip":
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        decoder = zlib.decompressobj()
    else:
        raise UnsupportedMediaTypeError(
            f"unsupported Content-Encoding '{encoding}'; use gzip or deflate"
        )
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInputError(f"body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLargeError(f"decompressed body exceeds {limit} bytes")
    return out


def _compress(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body, compresslevel=1)
    return zlib.compress(body, 1)


def _content_length(scope: Scope) -> int:
    """The declared Content-Length, -1 when there is none (or it is not a number)."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            return int(value) if value.isdigit() else -1
    return -1


def _too_large(size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"request body of {size} bytes exceeds the limit of {limit} bytes")


def _limited_receive(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises ``PayloadTooLargeError`` once the body passes ``limit``
    bytes, so an endpoint that reads the body whole never buffers more than that."""
    size = 0

    async def limited() -> Any:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        return message

    return limited


async def _refuse(send: Send, exc: GatewayError) -> None:
    status, headers, body = render_error(exc)
    headers = [*headers, (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def limit_body(
    app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app that answers 413 to any request whose body is over ``limit`` bytes: at
    once when its Content-Length says so, else when the body read passes the limit."""

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            declared = _content_length(scope)
            if declared > limit:
                await _refuse(send, _too_large(declared, limit))
                return
            receive = _limited_receive(receive, limit)
        await app(scope, receive, send)

    return limited


def _pick_encoding(accept: str) -> str | None:
    for part in accept.split(","):
        token = part.split(";")[0].strip().lower()
        if token in _ENCODINGS:
            return token
    return None


class HttpFrontEnd:
    """The V2 REST application. ``app`` is the ASGI callable to serve."""

    def __init__(
        self,
        plane: DataPlane,
        control: ModelControl,
        settings: HttpSettings,
        *,
        metrics: Callable[[], bytes] | None = None,
        access_log: AccessLog | None = None,
        limits: LimitsSettings | None = None,
        check: Callable[[Scope], None] | None = None,
    ) -> None:
        limits = limits or LimitsSettings()
        self._check = check
        """Access control, called first with every HTTP request's scope; raises to refuse."""
        self._feedback_limit = limits.feedback_body_bytes
        self._control_limit = limits.control_body_bytes
        self._offload_bytes = limits.offload_decode_bytes
        self._body_timeout_s = limits.seconds("body_timeout") or _BODY_TIMEOUT_S
        self._plane = plane
        self._metrics = metrics
        self._access = access_log
        self.responses: collections.Counter[str] = collections.Counter()
        """Infer responses by HTTP status code (for the metrics endpoint)."""
        self._control = control
        self._limit = settings.max_request_bytes
        self._rest = self._build_rest()

    # -- ASGI entry ---------------------------------------------------------------------

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._check is not None and scope["type"] == "http":
            try:
                self._check(scope)
            except GatewayError as exc:
                status, headers, body = render_error(exc)
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.endswith("/infer") and path.startswith("/v2/models/"):
                parts = path.split("/")
                if len(parts) == 5:
                    await self._infer(scope, receive, send, parts[3], "")
                    return
                if len(parts) == 7 and parts[4] == "versions":
                    await self._infer(scope, receive, send, parts[3], parts[5])
                    return
            # Every other POST: its route's body limit, checked before the body is read.
            limit = self._feedback_limit if path.endswith("/feedback") else self._control_limit
            declared = _content_length(scope)
            if declared > limit:
                await _refuse(send, _too_large(declared, limit))
                return
            receive = _limited_receive(receive, limit)
        await self._rest(scope, receive, send)

    # -- infer (hot path) ---------------------------------------------------------------

    async def _infer(
        self, scope: Scope, receive: Receive, send: Send, model: str, version: str
    ) -> None:
        started = time.perf_counter()
        request_id = ""
        served = ""
        status = 500
        try:
            header_length: int | None = None
            content_length = -1
            encoding = accept = ""
            timeout_ms: str | None = None
            routing_key: str | None = None
            pinned = ""
            given_id: str | None = None
            traceparent: str | None = None
            for key, value in scope["headers"]:
                if key not in _INFER_HEADERS:
                    continue
                if key == b"content-length":
                    content_length = int(value) if value.isdigit() else -1
                elif key == _HEADER_LENGTH:
                    if not value.isdigit():
                        raise InvalidInputError(
                            "Inference-Header-Content-Length must be a non-negative integer"
                        )
                    header_length = int(value)
                elif key == b"content-encoding":
                    encoding = value.decode("latin-1").strip().lower()
                elif key == b"accept-encoding":
                    accept = value.decode("latin-1")
                elif key == _TIMEOUT_HEADER:
                    timeout_ms = value.decode("latin-1")
                elif key == _ROUTING_KEY:
                    routing_key = value.decode("latin-1")
                elif key == _VERSION_HEADER:
                    pinned = value.decode("latin-1").strip()
                elif key == b"x-request-id":
                    given_id = value.decode("latin-1")
                elif key == b"traceparent":
                    traceparent = value.decode("latin-1")
            if content_length > self._limit:
                raise PayloadTooLargeError(
                    f"request body of {content_length} bytes exceeds the limit of "
                    f"{self._limit} bytes"
                )
            body = await self._read_body(receive)
            if encoding and encoding != "identity":
                body = _decompress(body, encoding, self._limit)
            if len(body) < self._offload_bytes:
                request = v2_json.decode_infer_request(body, header_length, model, version)
            else:
                request = await self._decode_large(body, header_length, model, version)
            plane = self._plane
            plane.admit(
                request,
                plane.deadline(
                    request, None if timeout_ms is None else parse_timeout_ms(timeout_ms)
                ),
                request_id=given_id,
                traceparent=traceparent,
                routing_key=routing_key,
                pinned=pinned,
            )
            request_id = request.id
            response = await plane.infer(request)
            served = response.model_version
            out, json_length = v2_json.encode_infer_response(response, request)
            headers = [
                (b"content-type", _OCTET if json_length is not None else _JSON),
                (_VERSION_HEADER, response.model_version.encode()),
            ]
            if request_id:
                headers.append((b"x-request-id", request_id.encode()))
            if json_length is not None:
                headers.append((_HEADER_LENGTH, str(json_length).encode()))
            response_encoding = _pick_encoding(accept) if accept else None
            if response_encoding:
                out = _compress(out, response_encoding)
                headers.append((b"content-encoding", response_encoding.encode()))
            headers.append((b"content-length", str(len(out)).encode()))
            writer = _response_writer(scope)
            if writer is not None:  # head and body leave in one system call
                writer.hold_next()
            try:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": out})
            finally:
                if writer is not None:
                    writer.flush()
            self.responses["200"] += 1
            status = 200
        except GatewayError as exc:
            status = http_status(exc.kind)
            self.responses[str(status)] += 1
            await self._send_error(send, exc, request_id)
        except _ClientGoneError:
            status = 499
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("unexpected error serving an infer request for '%s'", model)
            self.responses["500"] += 1
            await self._send_error(send, GatewayError("internal error while serving the request"))
        finally:
            access = self._access
            if access is not None and access.should_log(status != 200):
                access.log(
                    request_id,
                    "http",
                    model,
                    served or version,
                    status,
                    (time.perf_counter() - started) * 1000,
                )

    @staticmethod
    async def _decode_large(
        body: bytes, header_length: int | None, model: str, version: str
    ) -> InferRequest:
        """A large JSON body: refused at once when a cheap count shows more inputs than
        allowed, else decoded on a worker thread so other clients are served meanwhile."""
        json_part = body if header_length is None else body[:header_length]
        check_count("inputs", json_part.count(b'"shape"'), DEFAULT_LIMITS.max_inputs)
        return await asyncio.to_thread(
            v2_json.decode_infer_request, body, header_length, model, version
        )

    async def _read_body(self, receive: Receive) -> bytes:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGoneError
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            return body
        chunks = [body]
        size = len(body)
        try:
            async with asyncio.timeout(self._body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGoneError
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self._limit:
                        raise PayloadTooLargeError(
                            f"request body exceeds the limit of {self._limit} bytes"
                        )
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise InvalidInputError(
                f"request body incomplete after {self._body_timeout_s:g} s"
            ) from None
        return b"".join(chunks)

    @staticmethod
    async def _send_error(send: Send, exc: GatewayError, request_id: str = "") -> None:
        status, headers, body = render_error(exc, request_id)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- everything else (Starlette) -----------------------------------------------------

    def _build_rest(self) -> Starlette:
        def route(
            path: str, endpoint: Callable[[Request], Awaitable[Response]], methods: list[str]
        ) -> Route:
            return Route(path, endpoint, methods=methods)

        routes = [
            route("/v2/health/live", self._live, ["GET"]),
            route("/metrics", self._prometheus, ["GET"]),
            route("/v2/health/ready", self._ready, ["GET"]),
            route("/v2", self._server_metadata, ["GET"]),
            route("/v2/models/stats", self._stats, ["GET"]),
            route("/v2/models/{model}", self._model_metadata, ["GET"]),
            route("/v2/models/{model}/versions/{version}", self._model_metadata, ["GET"]),
            route("/v2/models/{model}/ready", self._model_ready, ["GET"]),
            route("/v2/models/{model}/route", self._route, ["GET"]),
            route("/v2/models/{model}/versions/{version}/ready", self._model_ready, ["GET"]),
            route("/v2/models/{model}/config", self._model_config, ["GET"]),
            route("/v2/models/{model}/versions/{version}/config", self._model_config, ["GET"]),
            route("/v2/models/{model}/stats", self._stats, ["GET"]),
            route("/v2/models/{model}/versions/{version}/stats", self._stats, ["GET"]),
            route("/v2/models/{model}/infer", self._infer_fallback, ["POST"]),
            route("/v2/models/{model}/versions/{version}/infer", self._infer_fallback, ["POST"]),
            route("/v2/models/{model}/feedback", self._post_feedback, ["POST"]),
            route("/v2/models/{model}/outcomes", self._get_outcomes, ["GET"]),
            route("/v2/repository/index", self._repository_index, ["POST"]),
            route("/v2/repository/models/{model}/load", self._load, ["POST"]),
            route("/v2/repository/models/{model}/unload", self._unload, ["POST"]),
        ]

        async def gateway_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, GatewayError)
            return error_response(exc)

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            message = {404: "Not Found", 405: "Method Not Allowed"}.get(
                exc.status_code, str(exc.detail)
            )
            response = error_response((exc.status_code, message))
            if exc.headers and "Allow" in exc.headers:  # RFC 9110: a 405 names the methods
                response.headers["Allow"] = exc.headers["Allow"]
            return response

        async def unexpected(request: Request, exc: Exception) -> Response:
            logger.exception("unexpected error serving %s", request.url.path, exc_info=exc)
            return error_response(InternalError("internal error"))

        return Starlette(
            routes=routes,
            exception_handlers={
                GatewayError: gateway_error,
                HTTPException: http_error,
                Exception: unexpected,
            },
        )

    def internal_routes(self) -> list[Route]:
        """The route view and outcomes, for the admin listener (always served there; on
        this listener unless ``http.internal_endpoints`` is "admin")."""

        def safe(
            handler: Callable[[Request], Awaitable[Response]],
        ) -> Callable[[Request], Awaitable[Response]]:
            async def run(request: Request) -> Response:
                try:
                    return await handler(request)
                except GatewayError as exc:
                    return error_response(exc)

            return run

        return [
            Route("/v2/models/{model}/route", safe(self._route), methods=["GET"]),
            Route("/v2/models/{model}/outcomes", safe(self._get_outcomes), methods=["GET"]),
        ]

    async def _prometheus(self, request: Request) -> Response:
        if self._metrics is None:
            raise HTTPException(404)
        return Response(self._metrics(), media_type=CONTENT_TYPE)

    async def _live(self, request: Request) -> Response:
        return _json_response({"live": True})

    async def _ready(self, request: Request) -> Response:
        ready = self._plane.is_ready()
        return _json_response({"ready": ready}, 200 if ready else 503)

    async def _server_metadata(self, request: Request) -> Response:
        return _json_response(
            {
                "name": self._plane.server_name,
                "version": self._plane.server_version,
                "extensions": list(self._plane.extensions),
            }
        )

    async def _model_metadata(self, request: Request) -> Response:
        name = request.path_params["model"]
        endpoint = self._plane.model(name, request.path_params.get("version", ""))
        return _json_response(
            v2_json.model_metadata(endpoint.model.signature, self._plane.versions(name))
        )

    async def _model_ready(self, request: Request) -> Response:
        name = request.path_params["model"]
        self._plane.require_ready(name, request.path_params.get("version", ""))
        return _json_response({"name": name, "ready": True})

    async def _route(self, request: Request) -> Response:
        """The live traffic split of a model and each variant's readiness (for load
        balancers and external splitters)."""
        return _json_response(self._plane.route_view(request.path_params["model"]))

    async def _model_config(self, request: Request) -> Response:
        endpoint = self._plane.model(
            request.path_params["model"], request.path_params.get("version", "")
        )
        return _json_response(v2_json.model_config(endpoint.model.signature))

    async def _stats(self, request: Request) -> Response:
        entries = self._plane.statistics(
            request.path_params.get("model"), request.path_params.get("version", "")
        )
        return _json_response(v2_json.model_statistics(entries))

    async def _infer_fallback(self, request: Request) -> Response:
        # Reached only for paths the fast dispatcher did not match (e.g. odd segments).
        raise InvalidInputError(f"invalid inference path {request.url.path}")

    async def _post_feedback(self, request: Request) -> Response:
        """Ground truth for earlier predictions: ``{"items": [{"id": ..., "truth": ...}]}``
        (a bare list of items is accepted too). Unknown and expired ids are counted in the
        answer, never an error for the whole call."""
        items = decode_feedback_json(await request.body())
        result = await self._plane.feedback(request.path_params["model"], items)
        return _json_response(msgspec.to_builtins(result))

    async def _get_outcomes(self, request: Request) -> Response:
        """Per-variant outcome metrics from joined ground truth, and the comparison of each
        version against the route's first (stable) variant."""
        return _json_response(self._plane.outcomes(request.path_params["model"]))

    async def _repository_index(self, request: Request) -> Response:
        body = await request.body()
        ready_only = False
        if body.strip():
            payload = v2_json.decode_json(body, "repository index request")
            if not isinstance(payload, dict):
                raise InvalidInputError("repository index request must be a JSON object")
            ready_only = bool(payload.get("ready", False))
        return _json_response(v2_json.repository_index(self._control.index(), ready_only))

    async def _repository_params(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        if not body.strip():
            return {}
        payload = v2_json.decode_json(body, "repository request")
        if not isinstance(payload, dict):
            raise InvalidInputError("repository request must be a JSON object")
        params = payload.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInputError("'parameters' must be a JSON object")
        return params

    async def _load(self, request: Request) -> Response:
        check_model_name(request.path_params["model"])
        params = await self._repository_params(request)
        await self._control.load(request.path_params["model"], params)
        return _json_response({})

    async def _unload(self, request: Request) -> Response:
        check_model_name(request.path_params["model"])
        await self._repository_params(request)
        await self._control.unload(request.path_params["model"])
        return _json_response({})
