"""What every peer adapter shares: its command line and an onnxruntime session.

Sessions use one intra-op and one inter-op thread (like the gateway's benchmark settings),
so that every server spends the same CPU on the model call itself.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

__all__ = ["AdapterArgs", "OnnxModel", "parse_args"]

LOOPBACK: Final = "127.0.0.1"


@dataclass(frozen=True)
class AdapterArgs:
    """``models`` maps model name -> ONNX path; ports are chosen free by the harness."""

    models: dict[str, str]
    http_port: int
    grpc_port: int
    metrics_port: int
    max_batch_size: int
    max_delay_us: int


def parse_args(description: str, argv: list[str] | None = None) -> AdapterArgs:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", action="append", required=True, help="name=path.onnx")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-delay-us", type=int, default=0)
    args = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in args.model)
    return AdapterArgs(
        models,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        args.max_batch_size,
        args.max_delay_us,
    )


class OnnxModel:
    """One onnxruntime session over a model with INPUT0 [batch, width] -> OUTPUT0."""

    def __init__(self, path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session: Any = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name: str = self.session.get_inputs()[0].name
        self.output_name: str = self.session.get_outputs()[0].name
        self.input_width = int(self.session.get_inputs()[0].shape[1])
        self.output_width = int(self.session.get_outputs()[0].shape[1])
        self(np.zeros((1, self.input_width), np.float32))  # warm-up: first call initialises

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = self.session.run(None, {self.input_name: x})[0]
        return out
