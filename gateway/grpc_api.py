"""grpc_api.py: the KServe V2 gRPC adapter (grpc.aio): decode -> dataplane -> encode; and the
gRPC health and feedback services.

Servicer methods translate between messages and the data plane through the codecs; call
metadata and deadlines are read here and handed over as plain values. Errors leave through one
wrapper that maps ``GatewayError`` kinds to status codes (``status.py``). ModelStreamInfer runs
the requests of one stream concurrently (bounded) and answers each as it completes, with its
``id`` echoed; a failed request is answered with ``error_message`` and the stream stays open.
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
from gateway.codecs.feedback import decode_feedback_message, encode_feedback_message
from gateway.codecs.limits import check_model_name
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, InvalidInputError
from gateway.logs import AccessLog
from gateway.status import grpc_code
from gateway.types import InferRequest, ModelControl

__all__ = ["InferenceServicer", "HealthServicer", "FeedbackServicer"]

logger = logging.getLogger(__name__)

_STREAM_CONCURRENCY: Final = 256  # requests admitted, not yet answered, per stream

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


_ROUTING_KEY: Final = "x-routing-key"
_VERSION_KEY: Final = "x-model-version"  # request: pin a version; trailer: served by


def _admit(
    plane: DataPlane, infer: InferRequest, deadline: float | None, fields: dict[str, Any] | None
) -> None:
    """Hand the call's deadline and metadata (request id, trace, routing key, pin) to the
    data plane; ``fields`` is the call's metadata as a dict, None when it carries none."""
    if fields:
        plane.admit(
            infer,
            deadline,
            request_id=fields.get("x-request-id"),
            traceparent=fields.get("traceparent"),
            routing_key=fields.get(_ROUTING_KEY),
            pinned=fields.get(_VERSION_KEY),
        )
    else:
        plane.admit(infer, deadline)


_ADMIT_KEYS: Final = frozenset({"x-request-id", "traceparent", _ROUTING_KEY, _VERSION_KEY})


def _fields(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, Any] | None:
    """The metadata the data plane reads, as a dict; None when the call carries none of it
    (most calls carry only ``user-agent``: no dict is built for them)."""
    metadata = context.invocation_metadata()
    if not metadata:
        return None
    keys = _ADMIT_KEYS
    for key, _ in metadata:
        if key in keys:
            return dict(metadata)
    return None


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the data plane and the codecs."""

    def __init__(
        self,
        plane: DataPlane,
        control: ModelControl,
        *,
        access_log: AccessLog | None = None,
        stream_max_unanswered: int = _STREAM_CONCURRENCY,
        control_check: Callable[[Any], None] | None = None,
    ) -> None:
        self._plane = plane
        self._control = control
        self._control_check = control_check
        """Called with a repository call's metadata first; raises when it is refused."""
        self._stream_limit = stream_max_unanswered
        self._draining = False
        self._streams: set[asyncio.Event] = set()
        self._access = access_log
        self.responses: collections.Counter[str] = collections.Counter()
        """Infer responses by gRPC status code name (for the metrics endpoint)."""

    def drain(self) -> None:
        """Shutdown begins: every open ModelStreamInfer stops reading, answers what it has
        read, and ends with UNAVAILABLE (retry on another replica or after a reconnect)."""
        self._draining = True
        for stream in self._streams:
            stream.set()

    async def ServerLive(  # noqa: N802 - protocol method name
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.is_ready())

    async def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=self._plane.is_model_ready(request.name, request.version)
        )

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        plane = self._plane
        return pb.ServerMetadataResponse(
            name=plane.server_name, version=plane.server_version, extensions=plane.extensions
        )

    @_guarded
    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        endpoint = self._plane.model(request.name, request.version)
        return v2_grpc.model_metadata(endpoint.model.signature, self._plane.versions(request.name))

    @_guarded
    async def ModelConfig(  # noqa: N802
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelConfigResponse:
        endpoint = self._plane.model(request.name, request.version)
        return v2_grpc.model_config(endpoint.model.signature)

    @_guarded
    async def ModelStatistics(  # noqa: N802
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelStatisticsResponse:
        return v2_grpc.model_statistics(self._plane.statistics(request.name, request.version))

    async def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        # Maps errors itself, as ``_guarded`` does, to save a coroutine frame per call.
        code = "INTERNAL"
        started = time.perf_counter()
        infer: InferRequest | None = None
        served = ""
        try:
            infer = v2_grpc.decode_infer_request(request)
            _admit(self._plane, infer, _deadline(context), _fields(context))
            response = await self._plane.infer(infer)
            served = response.model_version
            context.set_trailing_metadata(((_VERSION_KEY, served),))
            encoded = v2_grpc.encode_infer_response(response, infer)
            code = "OK"
            return encoded
        except GatewayError as exc:
            status = grpc_code(exc.kind)
            code = status.name
            await context.abort(status, exc.message)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            logger.exception("unexpected error in ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
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
        raise AssertionError("unreachable")  # abort() always raises

    async def ModelStreamInfer(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Flow control: a slot is taken when a request is read and freed only when its
        # answer has been handed to gRPC, so a client that stops reading stops the intake
        # with at most ``stream_max_unanswered`` answers held for it.
        limit = self._stream_limit
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(limit + 1)
        slots = asyncio.Semaphore(limit)
        tasks: set[asyncio.Task[None]] = set()
        deadline = _deadline(context)
        stream_fields = _fields(context)

        async def one(message: pb.ModelInferRequest) -> None:
            try:
                infer = v2_grpc.decode_infer_request(message)
                _admit(self._plane, infer, deadline, stream_fields)
                response = await self._plane.infer(infer)
                encoded = v2_grpc.encode_infer_response(response, infer)
                answer = pb.ModelStreamInferResponse(infer_response=encoded)
                self.responses["OK"] += 1
            except GatewayError as exc:
                self.responses[grpc_code(exc.kind).name] += 1
                answer = self._stream_error(message, exc.message)
            except asyncio.CancelledError:
                slots.release()
                raise
            except Exception as exc:
                logger.exception("unexpected error in a ModelStreamInfer request")
                self.responses["INTERNAL"] += 1
                answer = self._stream_error(
                    message, f"internal error: {type(exc).__name__} while serving the request"
                )
            # Never blocks: at most ``limit`` answers are pending (one per slot).
            results.put_nowait(answer)

        async def take() -> None:
            async for message in request_iterator:
                await slots.acquire()
                task = asyncio.create_task(one(message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        draining = asyncio.Event()

        async def read() -> None:
            # Reads until the client half-closes, or until the server drains: then the
            # requests read so far are answered and the stream ends UNAVAILABLE.
            taker = asyncio.create_task(take())
            stop = asyncio.create_task(draining.wait())
            try:
                await asyncio.wait((taker, stop), return_when=asyncio.FIRST_COMPLETED)
                if not taker.done():
                    taker.cancel()
                elif taker.exception() is not None:
                    logger.debug("ModelStreamInfer read ended", exc_info=taker.exception())
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                taker.cancel()
                stop.cancel()
                results.put_nowait(None)

        self._streams.add(draining)
        if self._draining:
            draining.set()
        reader = asyncio.create_task(read())
        try:
            while True:
                item = await results.get()
                if item is None:
                    break
                yield item
                slots.release()  # the answer is written: the slot may take another request
            if draining.is_set():
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down; requests not answered on this stream "
                    "were not processed, retry them on a new stream",
                )
        finally:
            self._streams.discard(draining)
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            while not results.empty():  # drop the answers nobody will read
                results.get_nowait()

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
        self._may_control(context)
        return v2_grpc.repository_index(self._control.index(), request.ready)

    def _may_control(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self._control_check is not None:
            self._control_check(context.invocation_metadata())

    @staticmethod
    def _model_name(request: Any) -> str:
        # Clients with the KServe copy of the protocol put the name in field 1.
        name: str = request.model_name or request.repository_name
        if not name:
            raise InvalidInputError("model_name is required")
        check_model_name(name)
        return name

    @_guarded
    async def RepositoryModelLoad(  # noqa: N802
        self,
        request: pb.RepositoryModelLoadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.RepositoryModelLoadResponse:
        self._may_control(context)
        params = v2_grpc.repository_parameters(request.parameters)
        await self._control.load(self._model_name(request), params)
        return pb.RepositoryModelLoadResponse()

    @_guarded
    async def RepositoryModelUnload(  # noqa: N802
        self,
        request: pb.RepositoryModelUnloadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.RepositoryModelUnloadResponse:
        self._may_control(context)
        await self._control.unload(self._model_name(request))
        return pb.RepositoryModelUnloadResponse()


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health: "" is the server's readiness, a model name that model's."""

    _Status = health_pb2.HealthCheckResponse

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    def _status(self, service: str) -> int:
        """ "" is the server; "model" the model's default version; "model/version" one
        variant (so a load balancer can health-check each arm of a split)."""
        if not service:
            ready: bool | None = self._plane.is_ready()
        else:
            name, _, version = service.partition("/")
            ready = self._plane.is_serving(name, version)
            if ready is None:
                return self._Status.SERVICE_UNKNOWN
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

    def __init__(self, plane: DataPlane, rate_check: Callable[[str], None] | None = None) -> None:
        self._plane = plane
        self._rate_check = rate_check
        """Called with the peer's address before decoding; raises when over its rate."""

    @_guarded
    async def Submit(  # noqa: N802
        self, request: feedback_pb2.FeedbackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feedback_pb2.FeedbackResponse:
        if self._rate_check is not None:
            self._rate_check(context.peer().rpartition(":")[0])
        items = decode_feedback_message(request)
        result = await self._plane.feedback(request.model_name, items)
        return encode_feedback_message(result)
