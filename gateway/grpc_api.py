"""grpc_api.py: the KServe V2 gRPC front end (grpc.aio) and the gRPC health service.

Servicer methods translate between messages and the core through ``v2_grpc``; deadlines
come from the call, errors leave through one wrapper that maps ``GatewayError`` kinds to
status codes (``status.py``). ModelStreamInfer runs the requests of one stream
concurrently (bounded) and answers each as it completes, with its ``id`` echoed; a failed
request is answered with ``error_message`` and the stream stays open.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc

from gateway._proto import feedback_pb2, feedback_pb2_grpc, health_pb2, health_pb2_grpc
from gateway._proto import grpc_service_pb2 as pb
from gateway._proto import grpc_service_pb2_grpc as pb_grpc
from gateway.codecs import v2_grpc
from gateway.errors import GatewayError, InvalidInputError, ModelNotFoundError
from gateway.feedback import FeedbackItem, FeedbackResult
from gateway.logs import AccessLog, RequestIds
from gateway.logs import request_id as request_id_from
from gateway.router import Router
from gateway.status import grpc_code
from gateway.types import InferRequest, ModelControl

__all__ = ["InferenceServicer", "HealthServicer", "build_server"]

logger = logging.getLogger(__name__)

_STREAM_CONCURRENCY: Final = 256  # requests in flight per stream before reading pauses

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Handler = Callable[[Any, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]]


def _guarded(fn: _Handler[_Req, _Resp]) -> _Handler[_Req, _Resp]:
    """Map ``GatewayError`` to its status code; anything else is INTERNAL, logged once."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: _Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Resp:
        try:
            return await fn(self, request, context)
        except GatewayError as exc:
            await context.abort(grpc_code(exc.kind), exc.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            logger.exception("unexpected error in %s", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable")  # abort() always raises

    return wrapper


_IDS: Final = RequestIds()
_ROUTING_KEY: Final = "x-routing-key"
_VERSION_KEY: Final = "x-model-version"  # request: pin a version; trailer: served by


def _route_fields(infer: InferRequest, metadata: dict[str, Any], assign_ids: bool = False) -> None:
    """Routing key, version pin and request id from call metadata or the V2
    ``routing_key`` parameter."""
    if not infer.id:
        if "x-request-id" in metadata or "traceparent" in metadata:
            infer.id = request_id_from(metadata)
        elif assign_ids:
            infer.id = _IDS.new()
    if not infer.model_version:
        pinned = metadata.get(_VERSION_KEY)
        if pinned:
            infer.model_version = str(pinned)
    key = metadata.get(_ROUTING_KEY)
    if key is None and infer.parameters and "routing_key" in infer.parameters:
        key = infer.parameters["routing_key"]
    if key is not None:
        infer.routing_key = str(key)


def _apply_metadata(
    infer: InferRequest, context: grpc.aio.ServicerContext[Any, Any], assign_ids: bool
) -> None:
    metadata = context.invocation_metadata()
    if metadata or infer.parameters or (assign_ids and not infer.id):
        _route_fields(infer, dict(metadata or ()), assign_ids)


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the shared router and codecs."""

    def __init__(
        self,
        router: Router,
        control: ModelControl,
        *,
        server_name: str,
        server_version: str,
        extensions: tuple[str, ...],
        is_ready: Callable[[], bool],
        access_log: AccessLog | None = None,
        assign_ids: bool = False,
    ) -> None:
        self._router = router
        self._control = control
        self._access = access_log
        self._assign_ids = assign_ids
        self._server_name = server_name
        self._server_version = server_version
        self._extensions = extensions
        self._is_ready = is_ready
        self.responses: collections.Counter[str] = collections.Counter()
        """Infer responses by gRPC status code name (for the metrics endpoint)."""

    async def ServerLive(  # noqa: N802 - protocol method name
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        # Unknown models are "not ready", not an error (what V2 clients expect).
        return pb.ModelReadyResponse(ready=self._router.is_ready(request.name, request.version))

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=self._server_name, version=self._server_version, extensions=self._extensions
        )

    @_guarded
    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        endpoint = self._router.resolve(request.name, request.version)
        return v2_grpc.model_metadata(endpoint.model.signature, self._router.versions(request.name))

    @_guarded
    async def ModelConfig(  # noqa: N802
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelConfigResponse:
        endpoint = self._router.resolve(request.name, request.version)
        return v2_grpc.model_config(endpoint.model.signature)

    @_guarded
    async def ModelStatistics(  # noqa: N802
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelStatisticsResponse:
        if not request.name:
            endpoints = list(self._router.endpoints())
        elif request.version:
            endpoints = [self._router.resolve(request.name, request.version)]
        else:
            self._router.resolve(request.name)
            endpoints = [e for e in self._router.endpoints() if e.model.name == request.name]
        return v2_grpc.model_statistics(
            (e.model.name, e.model.version, e.batcher.stats) for e in endpoints
        )

    @_guarded
    async def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        code = "INTERNAL"
        started = time.perf_counter()
        infer: InferRequest | None = None
        served = ""
        try:
            infer = v2_grpc.decode_infer_request(request)
            infer.deadline = _deadline(context)
            _apply_metadata(infer, context, self._assign_ids)
            response = await self._router.infer(infer)
            served = response.model_version
            context.set_trailing_metadata(((_VERSION_KEY, response.model_version),))
            encoded = v2_grpc.encode_infer_response(response, infer)
            code = "OK"
            return encoded
        except GatewayError as exc:
            code = grpc_code(exc.kind).name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.responses[code] += 1
            access = self._access
            if access is not None and access.should_log(code != "OK"):
                access.log(
                    infer.id if infer else request.id,
                    "grpc",
                    request.model_name,
                    served or request.model_version,
                    code,
                    (time.perf_counter() - started) * 1000,
                )

    async def ModelStreamInfer(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(_STREAM_CONCURRENCY)
        tasks: set[asyncio.Task[None]] = set()
        deadline = _deadline(context)
        stream_meta = dict(context.invocation_metadata() or ())

        async def one(message: pb.ModelInferRequest) -> None:
            try:
                infer = v2_grpc.decode_infer_request(message)
                infer.deadline = deadline
                _route_fields(infer, stream_meta, self._assign_ids)
                response = await self._router.infer(infer)
                encoded = v2_grpc.encode_infer_response(response, infer)
                results.put_nowait(pb.ModelStreamInferResponse(infer_response=encoded))
                self.responses["OK"] += 1
            except GatewayError as exc:
                self.responses[grpc_code(exc.kind).name] += 1
                results.put_nowait(self._stream_error(message, exc.message))
            except Exception:
                logger.exception("unexpected error in a ModelStreamInfer request")
                results.put_nowait(self._stream_error(message, "internal error"))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for message in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                results.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await results.get()
                if item is None:
                    break
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    @staticmethod
    def _stream_error(message: pb.ModelInferRequest, text: str) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(
            error_message=text,
            infer_response=pb.ModelInferResponse(
                model_name=message.model_name,
                model_version=message.model_version,
                id=message.id,
            ),
        )

    @_guarded
    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryIndexResponse:
        return v2_grpc.repository_index(self._control.index(), request.ready)

    @staticmethod
    def _model_name(request: Any) -> str:
        # Clients with the KServe copy of the protocol put the name in field 1.
        name: str = request.model_name or request.repository_name
        if not name:
            raise InvalidInputError("model_name is required")
        return name

    @_guarded
    async def RepositoryModelLoad(  # noqa: N802
        self,
        request: pb.RepositoryModelLoadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.RepositoryModelLoadResponse:
        params = v2_grpc.repository_parameters(request.parameters)
        await self._control.load(self._model_name(request), params)
        return pb.RepositoryModelLoadResponse()

    @_guarded
    async def RepositoryModelUnload(  # noqa: N802
        self,
        request: pb.RepositoryModelUnloadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.RepositoryModelUnloadResponse:
        await self._control.unload(self._model_name(request))
        return pb.RepositoryModelUnloadResponse()


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health: "" is the server's readiness, a model name that model's."""

    _Status = health_pb2.HealthCheckResponse

    def __init__(self, router: Router, is_ready: Callable[[], bool]) -> None:
        self._router = router
        self._is_ready = is_ready

    def _status(self, service: str) -> int:
        """ "" is the server; "model" the model's default version; "model/version" one
        variant (so a load balancer can health-check each arm of a split)."""
        if not service:
            return self._Status.SERVING if self._is_ready() else self._Status.NOT_SERVING
        name, _, version = service.partition("/")
        try:
            self._router.resolve(name, version)
        except ModelNotFoundError:
            return self._Status.SERVICE_UNKNOWN
        ready = self._is_ready() and self._router.is_ready(name, version)
        return self._Status.SERVING if ready else self._Status.NOT_SERVING

    async def Check(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status(request.service)
        if status == self._Status.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        return self._Status(status=status)  # type: ignore[arg-type]  # enum value as int

    async def Watch(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                last = status
                yield self._Status(status=status)  # type: ignore[arg-type]  # enum value
            await asyncio.sleep(0.5)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    """gateway.feedback.v1.Feedback: ground truth joined to earlier predictions by id."""

    def __init__(
        self, join: Callable[[str, list[FeedbackItem]], Awaitable[FeedbackResult]]
    ) -> None:
        self._join = join

    @_guarded
    async def Submit(  # noqa: N802
        self, request: feedback_pb2.FeedbackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feedback_pb2.FeedbackResponse:
        if not request.model_name:
            raise InvalidInputError("model_name is required")
        items = []
        for i, item in enumerate(request.items):
            if not item.id:
                raise InvalidInputError(f"items[{i}]: id is required")
            if item.labels and item.values:
                raise InvalidInputError(f"items[{i}]: give labels or values, not both")
            truth: Any = list(item.labels) if item.labels else list(item.values)
            if not truth:
                raise InvalidInputError(f"items[{i}]: no truth given")
            items.append(FeedbackItem(item.id, truth[0] if len(truth) == 1 else truth))
        result = await self._join(request.model_name, items)
        return feedback_pb2.FeedbackResponse(
            matched=result.matched,
            unknown=result.unknown_ids,
            expired=result.expired_ids,
            duplicate=result.duplicate,
            invalid=result.invalid,
            errors=list(result.errors),
        )


def build_server(
    inference: InferenceServicer,
    health: HealthServicer,
    max_message_bytes: int,
    feedback: FeedbackServicer | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with both services; the caller binds ports and starts it."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    # Generated registration functions carry no annotations.
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health, server)  # type: ignore[no-untyped-call]
    if feedback is not None:
        feedback_pb2_grpc.add_FeedbackServicer_to_server(feedback, server)  # type: ignore[no-untyped-call]
    return server
