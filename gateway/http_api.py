"""http_api.py: the KServe V2 REST front end (ASGI, served by uvicorn).

The infer route is a raw ASGI handler, the hot path: it reads the body, hands it to
``v2_json``, awaits the router and writes the answer in one ``send``. Every other V2 route
(health, metadata, config, statistics, repository) is a Starlette route. Errors become
``{"error": message}`` with the status from ``status.py``. Paths, headers and status codes
live here; tensors and dtypes do not.
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
from gateway.config import HttpSettings
from gateway.errors import (
    DeadlineExceededError,
    GatewayError,
    InternalError,
    InvalidInputError,
    ModelNotReadyError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from gateway.feedback import FeedbackItem, FeedbackResult
from gateway.logs import AccessLog, RequestIds
from gateway.logs import request_id as request_id_from
from gateway.metrics import CONTENT_TYPE
from gateway.router import Router
from gateway.status import error_response, http_status, render_error
from gateway.types import InferRequest, ModelControl

__all__ = ["HttpFrontEnd", "EXTENSIONS"]

logger = logging.getLogger(__name__)

EXTENSIONS: Final = (
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "parameters",
)
_JSON: Final = b"application/json"
_OCTET: Final = b"application/octet-stream"
_HEADER_LENGTH: Final = b"inference-header-content-length"
_TIMEOUT_HEADER: Final = b"x-request-timeout-ms"
_ROUTING_KEY: Final = b"x-routing-key"
_VERSION_HEADER: Final = b"x-model-version"  # request: pin a version; response: served by
_BODY_TIMEOUT_S: Final = 30.0  # a client that stops sending mid-body gets 408, not a hang
_ENCODINGS: Final = ("gzip", "deflate")


class _FeedbackBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    items: list[FeedbackItem]


_feedback_decoder: Final = msgspec.json.Decoder(_FeedbackBody | list[FeedbackItem])


class _ClientGoneError(Exception):
    """The client disconnected before the request was read."""


def _json_response(payload: Any, status: int = 200) -> Response:
    return Response(v2_json.encode_json(payload), status, media_type="application/json")


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
        router: Router,
        control: ModelControl,
        settings: HttpSettings,
        *,
        server_name: str,
        server_version: str,
        is_ready: Callable[[], bool],
        metrics: Callable[[], bytes] | None = None,
        feedback: Callable[[str, list[FeedbackItem]], Awaitable[FeedbackResult]] | None = None,
        outcomes: Callable[[str], dict[str, Any]] | None = None,
        access_log: AccessLog | None = None,
        assign_ids: bool = False,
    ) -> None:
        self._router = router
        self._metrics = metrics
        self._feedback = feedback
        self._outcomes = outcomes
        self._access = access_log
        self._assign_ids = assign_ids
        self._ids = RequestIds()
        self.responses: collections.Counter[str] = collections.Counter()
        """Infer responses by HTTP status code (for the metrics endpoint)."""
        self._control = control
        self._limit = settings.max_request_bytes
        self._server_name = server_name
        self._server_version = server_version
        self._is_ready = is_ready
        self._rest = self._build_rest()

    # -- ASGI entry ---------------------------------------------------------------------

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            request = v2_json.decode_infer_request(body, header_length, model, version or pinned)
            request.deadline = self._deadline(request, timeout_ms)
            if not request.id:
                if given_id or traceparent:
                    request.id = request_id_from(
                        {"x-request-id": given_id or "", "traceparent": traceparent or ""}
                    )
                elif self._assign_ids:
                    request.id = self._ids.new()
            request_id = request.id
            params = request.parameters
            if routing_key is not None:
                request.routing_key = routing_key
            elif params and "routing_key" in params:
                request.routing_key = str(params["routing_key"])
            response = await self._router.infer(request)
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
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": out})
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
            async with asyncio.timeout(_BODY_TIMEOUT_S):
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
                f"request body incomplete after {_BODY_TIMEOUT_S:.0f} s"
            ) from None
        return b"".join(chunks)

    @staticmethod
    def _deadline(request: InferRequest, timeout_ms: str | None) -> float | None:
        """A deadline from the V2 ``timeout`` parameter (µs) or the timeout header (ms)."""
        seconds = None
        if timeout_ms is not None:
            try:
                seconds = float(timeout_ms) / 1000
            except ValueError:
                raise InvalidInputError(
                    "x-request-timeout-ms must be a number of milliseconds"
                ) from None
        elif request.parameters and "timeout" in request.parameters:
            value = request.parameters["timeout"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInputError(
                    "parameter 'timeout' must be a non-negative integer (microseconds)"
                )
            seconds = value / 1e6 if value else None
        if seconds is None:
            return None
        if seconds <= 0:
            raise DeadlineExceededError("the request's timeout had passed on arrival")
        return time.monotonic() + seconds

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
            return error_response((exc.status_code, message))

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

    async def _prometheus(self, request: Request) -> Response:
        if self._metrics is None:
            raise HTTPException(404)
        return Response(self._metrics(), media_type=CONTENT_TYPE)

    async def _live(self, request: Request) -> Response:
        return _json_response({"live": True})

    async def _ready(self, request: Request) -> Response:
        ready = self._is_ready()
        return _json_response({"ready": ready}, 200 if ready else 503)

    async def _server_metadata(self, request: Request) -> Response:
        return _json_response(
            {
                "name": self._server_name,
                "version": self._server_version,
                "extensions": list(EXTENSIONS),
            }
        )

    async def _model_metadata(self, request: Request) -> Response:
        name = request.path_params["model"]
        endpoint = self._router.resolve(name, request.path_params.get("version", ""))
        return _json_response(
            v2_json.model_metadata(endpoint.model.signature, self._router.versions(name))
        )

    async def _model_ready(self, request: Request) -> Response:
        name = request.path_params["model"]
        version = request.path_params.get("version", "")
        if not self._router.is_ready(name, version):
            suffix = f" version {version}" if version else ""
            raise ModelNotReadyError(f"model '{name}'{suffix} is not ready")
        return _json_response({"name": name, "ready": True})

    async def _route(self, request: Request) -> Response:
        """The live traffic split of a model and each variant's readiness (for load
        balancers and external splitters)."""
        name = request.path_params["model"]
        self._router.resolve(name)
        route = self._router.get_route(name)
        if route is None:
            default = self._router.resolve(name).model.version
            variants = [{"version": default, "weight": 1.0}]
            shadows: list[dict[str, Any]] = []
        else:
            total = sum(v.weight for v in route.variants) or 1.0
            variants = [{"version": v.version, "weight": v.weight / total} for v in route.variants]
            shadows = [{"version": s.version, "sample_rate": s.sample_rate} for s in route.shadows]
        traffic = {t.version: t for t in self._router.traffic(name)}
        for entry in variants + shadows:
            version = str(entry["version"])
            entry["ready"] = self._router.is_ready(name, version)
            seen = traffic.get(version)
            if seen is not None:
                entry["requests"] = seen.requests
                entry["errors"] = seen.errors
                entry["p99_ms"] = seen.p(0.99)
        for entry in shadows:
            seen = traffic.get(str(entry["version"]))
            entry["comparison"] = seen.shadow if seen is not None else {}
        return _json_response({"model": name, "variants": variants, "shadows": shadows})

    async def _model_config(self, request: Request) -> Response:
        endpoint = self._router.resolve(
            request.path_params["model"], request.path_params.get("version", "")
        )
        return _json_response(v2_json.model_config(endpoint.model.signature))

    async def _stats(self, request: Request) -> Response:
        name = request.path_params.get("model")
        version = request.path_params.get("version", "")
        if name is None:
            endpoints = list(self._router.endpoints())
        elif version:
            endpoints = [self._router.resolve(name, version)]
        else:
            self._router.resolve(name)
            endpoints = [e for e in self._router.endpoints() if e.model.name == name]
        entries = [(e.model.name, e.model.version, e.batcher.stats) for e in endpoints]
        return _json_response(v2_json.model_statistics(entries))

    async def _infer_fallback(self, request: Request) -> Response:
        # Reached only for paths the fast dispatcher did not match (e.g. odd segments).
        raise InvalidInputError(f"invalid inference path {request.url.path}")

    async def _post_feedback(self, request: Request) -> Response:
        """Ground truth for earlier predictions: ``{"items": [{"id": ..., "truth": ...}]}``
        (a bare list of items is accepted too). Unknown and expired ids are counted in the
        answer, never an error for the whole call."""
        if self._feedback is None:
            raise HTTPException(404)
        body = await request.body()
        try:
            payload = _feedback_decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise InvalidInputError(f"invalid feedback: {exc}") from None
        except msgspec.DecodeError as exc:
            raise InvalidInputError(f"malformed JSON in feedback: {exc}") from None
        items = payload if isinstance(payload, list) else payload.items
        result = await self._feedback(request.path_params["model"], items)
        return _json_response(msgspec.to_builtins(result))

    async def _get_outcomes(self, request: Request) -> Response:
        """Per-variant outcome metrics from joined ground truth, and the comparison of each
        version against the route's first (stable) variant."""
        if self._outcomes is None:
            raise HTTPException(404)
        name = request.path_params["model"]
        self._router.resolve(name)
        return _json_response(self._outcomes(name))

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
        params = await self._repository_params(request)
        await self._control.load(request.path_params["model"], params)
        return _json_response({})

    async def _unload(self, request: Request) -> Response:
        await self._repository_params(request)
        await self._control.unload(request.path_params["model"])
        return _json_response({})
