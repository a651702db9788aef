"""python -m bench.bare: the stack floor, minimal V2 servers around one onnxruntime session.

Each ``--kind`` is the least a stack needs to answer a V2 ModelInfer for one model, so that
``bench.floor`` can measure what the stack itself costs per request next to the gateway:

- ``grpc-aio``: grpc.aio server, inference inline in the coroutine; serves ModelInfer and
  ModelStreamInfer (one bidirectional stream answers each request in order).
  ``--uvloop`` runs it on uvloop's event loop (as the gateway does).
- ``grpc-sync``: grpcio's synchronous server on a thread pool (``--threads``, default 4).
  ``--handoff loop`` runs each handler on an asyncio event loop in another thread and
  waits for it (run_coroutine_threadsafe): what a sync front end costs that keeps an
  asyncio core behind it.
- ``asgi``: a raw ASGI app on uvicorn (uvloop, httptools, no access log, no lifespan).
- ``starlette``: a Starlette route reading the body and answering with a Response; the JSON
  header encoded and decoded with msgspec.
- ``gateway-handler``: not a floor but a probe: the gateway itself (``gateway serve`` with
  bench.floor's settings: its listeners, threads, options and defaults) whose gRPC
  ModelInfer is this module's grpc.aio handler. Beside the bare grpc.aio server it shows
  what the gateway's process costs a request apart from its request path; beside the
  gateway, what its request path costs served. gRPC ModelInfer only.

HTTP speaks the V2 binary tensor extension (and plain V2 JSON when no
``Inference-Header-Content-Length`` is sent: the readiness probe uses it). gRPC takes
``raw_input_contents`` only. Enough metadata for perf_analyzer: server metadata (no
extensions), model metadata, model config (``max_batch_size`` 64, so it sends one row of
``[width]``), plus a statistics call that reports the successful inference count (not
advertised; the harness reads it to divide CPU by requests served). Binds 127.0.0.1 only.
Nothing else: no batching, no routing, no metrics, no logging per request.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import msgspec
import numpy as np

from bench.peers.adapters._common import LOOPBACK, OnnxModel
from gateway._proto import grpc_service_pb2 as pb
from gateway._proto import model_config_pb2 as mc

__all__ = ["KINDS", "Floor", "main"]

KINDS: Final = ("grpc-aio", "grpc-sync", "asgi", "starlette", "gateway-handler")
MAX_BATCH_SIZE: Final = 64
MAX_BODY_BYTES: Final = 64 << 20
_SERVICE: Final = "inference.GRPCInferenceService"
_JSON_CT: Final = b"application/json"
_BINARY_CT: Final = b"application/octet-stream"


class BadRequestError(ValueError):
    """The request is not a one-FP32-input V2 inference this server can run."""


class Floor:
    """One model and a served-request counter; the part every kind shares."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.model = OnnxModel(path)
        self.success_count = 0
        self._lock = threading.Lock()  # the sync server counts from several threads

    def count(self) -> None:
        with self._lock:
            self.success_count += 1

    def run(self, blob: bytes | memoryview, shape: list[int]) -> Any:
        width = self.model.input_width
        if len(shape) != 2 or shape[1] != width or not 0 < shape[0] <= MAX_BATCH_SIZE:
            raise BadRequestError(
                f"INPUT0 shape must be [1..{MAX_BATCH_SIZE}, {width}], not {shape}"
            )
        if len(blob) != 4 * shape[0] * width:
            raise BadRequestError(f"INPUT0 holds {len(blob)} bytes, shape {shape} needs FP32")
        return self.model(np.frombuffer(blob, np.float32).reshape(shape))

    # ------------------------------------------------------------------ gRPC
    def grpc_infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        if len(request.inputs) != 1 or len(request.raw_input_contents) != 1:
            raise BadRequestError("one input with raw_input_contents expected")
        tensor = request.inputs[0]
        if tensor.datatype != "FP32":
            raise BadRequestError(f"INPUT0 datatype must be FP32, not {tensor.datatype!r}")
        y = self.run(request.raw_input_contents[0], list(tensor.shape))
        response = pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id)
        out = response.outputs.add()
        out.name = self.model.output_name
        out.datatype = "FP32"
        out.shape.extend(y.shape)
        response.raw_output_contents.append(y.tobytes())
        self.count()
        return response

    def grpc_server_metadata(self, _: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="bare", version="1")

    def grpc_model_metadata(self, _: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        reply = pb.ModelMetadataResponse(name=self.name, versions=["1"], platform="onnxruntime")
        for tensors, name, width in (
            (reply.inputs, self.model.input_name, self.model.input_width),
            (reply.outputs, self.model.output_name, self.model.output_width),
        ):
            tensors.add(name=name, datatype="FP32", shape=[-1, width])
        return reply

    def grpc_model_config(self, _: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        config = mc.ModelConfig(
            name=self.name, platform="onnxruntime_onnx", max_batch_size=MAX_BATCH_SIZE
        )
        config.input.add(
            name=self.model.input_name, data_type=mc.TYPE_FP32, dims=[self.model.input_width]
        )
        config.output.add(
            name=self.model.output_name, data_type=mc.TYPE_FP32, dims=[self.model.output_width]
        )
        return pb.ModelConfigResponse(config=config)

    def grpc_model_statistics(self, _: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        reply = pb.ModelStatisticsResponse()
        stats = reply.model_stats.add(name=self.name, version="1")
        stats.inference_stats.success.count = self.success_count
        return reply

    # ------------------------------------------------------------------ HTTP
    def http_infer(self, body: bytes, header_length: int | None) -> tuple[bytes, bytes, int]:
        """(content type, body, JSON header length or -1) for a V2 infer body."""
        if header_length is None:
            request = msgspec.json.decode(body)
            tensor = request["inputs"][0]
            x = np.asarray(tensor["data"], np.float32)
            y = self.run(x.tobytes(), tensor["shape"])
            self.count()
            reply = self._http_reply(y)
            reply["outputs"][0]["data"] = y.ravel().tolist()
            return _JSON_CT, msgspec.json.encode(reply), -1
        if not 0 < header_length <= len(body):
            raise BadRequestError(f"Inference-Header-Content-Length {header_length} out of range")
        request = msgspec.json.decode(body[:header_length])
        tensor = request["inputs"][0]
        if tensor.get("datatype") != "FP32":
            raise BadRequestError("INPUT0 datatype must be FP32")
        y = self.run(memoryview(body)[header_length:], tensor["shape"])
        self.count()
        blob = y.tobytes()
        reply = self._http_reply(y)
        reply["outputs"][0]["parameters"] = {"binary_data_size": len(blob)}
        head = msgspec.json.encode(reply)
        return _BINARY_CT, head + blob, len(head)

    def _http_reply(self, y: Any) -> dict[str, Any]:
        output = {"name": self.model.output_name, "datatype": "FP32", "shape": list(y.shape)}
        return {"model_name": self.name, "model_version": "1", "outputs": [output]}

    def http_get(self, path: str) -> bytes | None:
        """JSON for the GET routes perf_analyzer and the harness read; None if unknown."""
        base = f"/v2/models/{self.name}"
        if path == "/v2":
            return msgspec.json.encode({"name": "bare", "version": "1", "extensions": []})
        if path in (base, f"{base}/versions/1"):
            meta = self.grpc_model_metadata(pb.ModelMetadataRequest())
            tensors = [
                [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]
                for ts in (meta.inputs, meta.outputs)
            ]
            return msgspec.json.encode(
                {
                    "name": self.name,
                    "versions": ["1"],
                    "platform": "onnxruntime",
                    "inputs": tensors[0],
                    "outputs": tensors[1],
                }
            )
        if path in (f"{base}/config", f"{base}/versions/1/config"):
            return msgspec.json.encode(
                {
                    "name": self.name,
                    "platform": "onnxruntime_onnx",
                    "max_batch_size": MAX_BATCH_SIZE,
                    "input": [
                        {
                            "name": self.model.input_name,
                            "data_type": "TYPE_FP32",
                            "dims": [self.model.input_width],
                        }
                    ],
                    "output": [
                        {
                            "name": self.model.output_name,
                            "data_type": "TYPE_FP32",
                            "dims": [self.model.output_width],
                        }
                    ],
                }
            )
        if path in (f"{base}/stats", f"{base}/versions/1/stats"):
            success = {"count": self.success_count, "ns": 0}
            stats = {"name": self.name, "version": "1", "inference_stats": {"success": success}}
            return msgspec.json.encode({"model_stats": [stats]})
        return None

    @property
    def infer_path(self) -> str:
        return f"/v2/models/{self.name}/infer"


# --------------------------------------------------------------------------- gRPC servers


def _grpc_handlers(floor: Floor, wrap: Callable[[Callable[[Any], Any]], Any]) -> Any:
    """The generic handler for every kind: ``wrap`` adapts a plain function to the server
    flavour (async for grpc.aio, plain for the sync server) and turns BadRequestError into
    INVALID_ARGUMENT."""
    import grpc

    unary: dict[str, tuple[Callable[[Any], Any], Any]] = {
        "ModelInfer": (floor.grpc_infer, pb.ModelInferRequest),
        "ServerMetadata": (floor.grpc_server_metadata, pb.ServerMetadataRequest),
        "ModelMetadata": (floor.grpc_model_metadata, pb.ModelMetadataRequest),
        "ModelConfig": (floor.grpc_model_config, pb.ModelConfigRequest),
        "ModelStatistics": (floor.grpc_model_statistics, pb.ModelStatisticsRequest),
    }
    handlers: dict[str, Any] = {
        name: grpc.unary_unary_rpc_method_handler(
            wrap(fn),
            request_deserializer=message.FromString,
            response_serializer=_serialize,
        )
        for name, (fn, message) in unary.items()
    }
    return handlers


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _aio_handler(fn: Callable[[Any], Any]) -> Callable[[Any, Any], Awaitable[Any]]:
    """A grpc.aio unary handler around ``fn``: a refused request is INVALID_ARGUMENT."""
    import grpc

    async def handler(request: Any, context: Any) -> Any:
        try:
            return fn(request)
        except (BadRequestError, KeyError, TypeError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return handler


async def _serve_grpc_aio(floor: Floor, port: int) -> None:
    import grpc

    async def stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            try:
                yield pb.ModelStreamInferResponse(infer_response=floor.grpc_infer(request))
            except BadRequestError as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc))

    handlers = _grpc_handlers(floor, _aio_handler)
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        stream, request_deserializer=pb.ModelInferRequest.FromString, response_serializer=_serialize
    )
    server = grpc.aio.server(options=_GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def _serve_grpc_sync(floor: Floor, port: int, threads: int, handoff: str) -> None:
    import grpc

    loop: asyncio.AbstractEventLoop | None = None
    if handoff == "loop":
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="core-loop", daemon=True).start()

    def wrap(fn: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
        async def on_loop(request: Any) -> Any:
            return fn(request)

        def handler(request: Any, context: Any) -> Any:
            try:
                if loop is None:
                    return fn(request)
                return asyncio.run_coroutine_threadsafe(on_loop(request), loop).result()
            except (BadRequestError, KeyError, TypeError) as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        return handler

    def stream(requests: Iterator[Any], context: Any) -> Iterator[Any]:
        for request in requests:
            try:
                yield pb.ModelStreamInferResponse(infer_response=floor.grpc_infer(request))
            except BadRequestError as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc))

    handlers = _grpc_handlers(floor, wrap)
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        stream, request_deserializer=pb.ModelInferRequest.FromString, response_serializer=_serialize
    )
    server = grpc.server(
        ThreadPoolExecutor(threads), options=_GRPC_OPTIONS, maximum_concurrent_rpcs=None
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


_GRPC_OPTIONS: Final = [
    ("grpc.max_send_message_length", MAX_BODY_BYTES),
    ("grpc.max_receive_message_length", MAX_BODY_BYTES),
]


# --------------------------------------------------------------------------- HTTP servers


def _serve_gateway_handler(floor: Floor, model_path: str, port: int) -> None:
    """``gateway serve`` on the model's repository, its ModelInfer the bare handler."""
    import shutil
    import tempfile
    from pathlib import Path

    from bench.peers.servers import gateway_settings
    from gateway import grpc_api
    from gateway.cli import main as gateway_main

    # The grpc-aio kind's own handler, called as the servicer's method (no extra frame).
    grpc_api.InferenceServicer.ModelInfer = staticmethod(  # type: ignore[method-assign, assignment]
        _aio_handler(floor.grpc_infer)
    )
    repository = Path(model_path).parents[2]  # <repository>/<model>/<version>/model.onnx
    data = Path(tempfile.mkdtemp(prefix="bench-gateway-handler-"))
    config = data / "gateway.toml"
    config.write_text(gateway_settings(data / "data"))
    args = ["serve", "--config", str(config), "--model-repository", str(repository)]
    args += ["--host", LOOPBACK, "--http-port", "0", "--grpc-port", str(port)]
    try:
        gateway_main([*args, "--log-level", "WARNING"])
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _header_length(value: bytes | str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise BadRequestError(
            f"Inference-Header-Content-Length {value!r} is not an integer"
        ) from exc


def asgi_app(floor: Floor) -> Callable[..., Awaitable[None]]:
    """A raw ASGI app: POST the infer path, GET the metadata paths; nothing else."""
    infer_path = floor.infer_path

    async def respond(send: Any, status: int, content_type: bytes, body: bytes, hlen: int) -> None:
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        if hlen >= 0:
            headers.append((b"inference-header-content-length", b"%d" % hlen))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] == "GET":
            body = floor.http_get(path)
            if body is None:
                await respond(send, 404, _JSON_CT, b'{"error":"not found"}', -1)
            else:
                await respond(send, 200, _JSON_CT, body, -1)
            return
        if path != infer_path:
            await respond(send, 404, _JSON_CT, b'{"error":"not found"}', -1)
            return
        hlen: bytes | None = None
        for key, value in scope["headers"]:
            if key == b"inference-header-content-length":
                hlen = value
        message = await receive()
        body = message.get("body", b"")
        while message.get("more_body"):
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                await respond(send, 413, _JSON_CT, b'{"error":"body too large"}', -1)
                return
        try:
            await respond(send, 200, *floor.http_infer(body, _header_length(hlen)))
        except (BadRequestError, msgspec.DecodeError, KeyError, TypeError, IndexError) as exc:
            error = msgspec.json.encode({"error": str(exc)})
            await respond(send, 400, _JSON_CT, error, -1)

    return app


def starlette_app(floor: Floor) -> Any:
    """A Starlette app: one route per path, Request.body() in, Response out."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request: Request) -> Response:
        body = await request.body()
        try:
            hlen = _header_length(request.headers.get("inference-header-content-length"))
            content_type, out, out_hlen = floor.http_infer(body, hlen)
        except (BadRequestError, msgspec.DecodeError, KeyError, TypeError, IndexError) as exc:
            error = msgspec.json.encode({"error": str(exc)})
            return Response(error, 400, media_type="application/json")
        headers = {"inference-header-content-length": str(out_hlen)} if out_hlen >= 0 else None
        return Response(out, headers=headers, media_type=content_type.decode())

    async def get(request: Request) -> Response:
        body = floor.http_get(request.url.path)
        if body is None:
            return Response(b'{"error":"not found"}', 404, media_type="application/json")
        return Response(body, media_type="application/json")

    base = f"/v2/models/{floor.name}"
    gets = ["/v2", base, f"{base}/versions/1", f"{base}/config", f"{base}/versions/1/config"]
    gets += [f"{base}/stats", f"{base}/versions/1/stats"]
    routes = [Route(floor.infer_path, infer, methods=["POST"])]
    routes += [Route(path, get, methods=["GET"]) for path in gets]
    return Starlette(routes=routes)


def _serve_http(app: Any, port: int) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host=LOOPBACK,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        lifespan="off",
        log_level="warning",
    )


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--model", action="append", required=True, help="name=path.onnx")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=4, help="grpc-sync worker threads")
    parser.add_argument(
        "--handoff", choices=("none", "loop"), default="none", help="grpc-sync: run on a loop"
    )
    parser.add_argument("--uvloop", action="store_true", help="grpc-aio on uvloop")
    # Accepted (the harness passes them to every server) and unused.
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE)
    args = parser.parse_args(argv)
    if len(args.model) != 1:
        parser.error("one --model name=path")
    name, path = args.model[0].split("=", 1)
    floor = Floor(name, path)
    if args.kind == "grpc-aio" and args.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve_grpc_aio(floor, args.grpc_port))
    elif args.kind == "grpc-aio":
        asyncio.run(_serve_grpc_aio(floor, args.grpc_port))
    elif args.kind == "grpc-sync":
        _serve_grpc_sync(floor, args.grpc_port, args.threads, args.handoff)
    elif args.kind == "gateway-handler":
        _serve_gateway_handler(floor, path, args.grpc_port)
    elif args.kind == "asgi":
        _serve_http(asgi_app(floor), args.http_port)
    else:
        _serve_http(starlette_app(floor), args.http_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
