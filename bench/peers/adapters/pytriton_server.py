"""PyTriton adapter: a real tritonserver (2.51, inside nvidia-pytriton 0.7.0) serving the
ONNX models through PyTriton's Python inference callables, V2 HTTP and gRPC on loopback.

Batching: Triton's dynamic batcher, max_batch_size 64 and max_queue_delay 0 µs (the
gateway's work-conserving setting). ``statistics`` is left out of PyTriton's token-guarded
endpoints so perf_analyzer (which reads model statistics) can drive it. Needs the
interpreter's LIBDIR first on LD_LIBRARY_PATH (the harness sets it): the python backend stub
links libpython3.11 and otherwise loads the system's copy and crashes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# Not installed in the project venv that runs mypy: only in bench/.peers/pytriton.
from pytriton.decorators import batch  # type: ignore[import-not-found]
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # type: ignore[import-not-found]
from pytriton.triton import (  # type: ignore[import-not-found]
    Triton,
    TritonConfig,
    TritonSecurityConfig,
)

from bench.peers.adapters._common import LOOPBACK, OnnxModel, parse_args


def _infer_fn(model: OnnxModel) -> Callable[..., dict[str, Any]]:
    @batch  # type: ignore[untyped-decorator]  # pytriton is untyped here
    def infer(**inputs: Any) -> dict[str, Any]:
        return {model.output_name: model(inputs[model.input_name])}

    return infer  # type: ignore[no-any-return]  # the decorator returns Any


def main() -> None:
    args = parse_args(__doc__ or "")
    config = TritonConfig(
        http_address=LOOPBACK,
        http_port=args.http_port,
        grpc_address=LOOPBACK,
        grpc_port=args.grpc_port,
        metrics_address=LOOPBACK,
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    # PyTriton 0.7's defaults plus no "statistics" (perf_analyzer needs it open).
    security = TritonSecurityConfig(
        restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"]
    )
    with Triton(config=config, security_config=security) as triton:
        for name, path in args.models.items():
            model = OnnxModel(path)
            triton.bind(
                model_name=name,
                infer_func=_infer_fn(model),
                inputs=[
                    Tensor(name=model.input_name, dtype=np.float32, shape=(model.input_width,))
                ],
                outputs=[
                    Tensor(name=model.output_name, dtype=np.float32, shape=(model.output_width,))
                ],
                config=ModelConfig(
                    max_batch_size=args.max_batch_size,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_delay_us),
                ),
                strict=False,
            )
        triton.serve()


if __name__ == "__main__":
    main()
