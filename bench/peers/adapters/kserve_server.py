"""KServe ModelServer adapter (kserve 0.21.0): V2 REST and gRPC on loopback.

KServe hard-codes 0.0.0.0 (REST) and [::] (gRPC); both are rebound to 127.0.0.1 here by
wrapping uvicorn's Config and grpc.aio's server. The Python ModelServer has no batcher
(KServe batches in its separate agent), so each request runs alone, inline in ``predict``.
Per-request logging (latency trace, access log, the gRPC interceptor's line) is turned off,
as it is in the gateway by default. Responses follow the request: binary outputs when the
REST client asked for them (request output ``binary_data`` or ``binary_data_output``), raw
contents over gRPC when the inputs came raw; ``response_id`` is never None (PEERS.md).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

# Not installed in the project venv that runs mypy: only in bench/.peers/kserve.
import kserve  # type: ignore[import-not-found]
import uvicorn
from kserve.protocol.infer_type import (  # type: ignore[import-not-found]
    InferOutput,
    InferRequest,
    InferResponse,
)

from bench.peers.adapters._common import LOOPBACK, OnnxModel, parse_args


def _bind_loopback() -> None:
    original_config = uvicorn.Config.__init__

    def config_init(self: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        kwargs["host"] = LOOPBACK
        kwargs["access_log"] = False  # per-request logging off, as in the gateway
        original_config(self, *args, **kwargs)

    uvicorn.Config.__init__ = config_init  # type: ignore[method-assign]  # deliberate patch
    original_server = grpc.aio.server

    def server(*args: Any, **kwargs: Any) -> Any:
        instance = original_server(*args, **kwargs)
        add_port = instance.add_insecure_port
        instance.add_insecure_port = lambda address: add_port(
            address.replace("[::]", LOOPBACK).replace("0.0.0.0", LOOPBACK)
        )
        return instance

    grpc.aio.server = server


class OnnxKServeModel(kserve.Model):  # type: ignore[misc]  # kserve is untyped here
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.model: OnnxModel | None = None

    def load(self) -> bool:
        self.model = OnnxModel(self.path)
        self.ready = True
        return True

    def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        assert self.model is not None
        y = self.model(payload.inputs[0].as_numpy())
        binary = payload.use_binary_outputs
        output = InferOutput(name=self.model.output_name, shape=list(y.shape), datatype="FP32")
        output.set_data_from_numpy(y, binary_data=binary)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=[output],
            use_binary_outputs=binary,
            requested_outputs=payload.request_outputs,
        )


def main() -> None:
    args = parse_args(__doc__ or "")
    _bind_loopback()
    models = [OnnxKServeModel(name, path) for name, path in args.models.items()]
    for model in models:
        model.load()
    server = kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        enable_latency_logging=False,
    )
    # After ModelServer() (it configures logging): its gRPC interceptor and trace logger
    # write a line per request at INFO; the gateway writes none.
    for name in ("kserve", "kserve.trace", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start(models)


if __name__ == "__main__":
    main()
